"""``hetsched keys generate DIR``: CURVE key pairs for the service and its clients (docs/security.md)."""

from __future__ import annotations

import argparse
import os


def add_client_key_arguments(parser: argparse.ArgumentParser) -> None:
    """``--server-key PATH --client-key PATH`` for commands that connect to a service."""
    parser.add_argument("--server-key", metavar="PATH",
                        help="the service's public key (server.key) when it uses CURVE (docs/security.md)")
    parser.add_argument("--client-key", metavar="PATH",
                        help="this client's secret key file (NAME.key_secret) when the service uses CURVE")


def client_key_options(args: argparse.Namespace) -> dict:
    """Keyword arguments for ``hetsched.client.Client`` from those two options."""
    return {"server_public_key": getattr(args, "server_key", None),
            "client_secret_key_file": getattr(args, "client_key", None)}


def config_snippet(result: dict, config_dir: str | None = None) -> str:
    """The ``security:`` section that uses ``result`` (paths relative to ``config_dir`` if given)."""
    def rel(p: str) -> str:
        return os.path.relpath(p, config_dir) if config_dir else p
    return ("security:\n"
            f"  server_secret_key: {rel(result['server_secret'])}\n"
            f"  authorized_clients: {rel(result['authorized_clients'])}\n"
            "server:\n"
            "  bind: tcp://0.0.0.0:5555        # or one interface's address\n")


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from hetsched.wire.keys import generate_keys
    res = generate_keys(args.dir, clients=args.client or ["client"], overwrite=args.force)
    print(f"wrote CURVE keys to {res['directory']}:")
    print(f"  {res['server_secret']}   server secret key (mode 0600): stays on the server")
    print(f"  {res['server_public']}          server public key: give it to every client")
    for name, c in res["clients"].items():
        print(f"  {c['secret']}   client {name!r} secret key (mode 0600): give it to that client only")
        print(f"  {c['authorized']}   client {name!r} public key, authorized")
    print("\nconfig for the service (paths are relative to the config file's directory; absolute here):\n")
    print(config_snippet(res))
    first = next(iter(res["clients"].values()))
    print("clients connect with:\n")
    print(f"  hetsched feed --connect tcp://SERVER:5555 --server-key {res['server_public']} "
          f"--client-key {first['secret']} --synthetic\n")
    print("To authorize another client later: copy its NAME.key (public) into "
          f"{res['authorized_clients']} and restart the service. To revoke one: delete its file there.")
    return 0


def add_parser(sub, common) -> None:
    sp = sub.add_parser("keys", help="CURVE keys for tcp:// clients (docs/security.md)")
    ksub = sp.add_subparsers(dest="keys_command", required=True)
    g = ksub.add_parser("generate", help="write a server key pair and client key pairs into DIR")
    g.add_argument("dir", metavar="DIR", help="directory for the keys (created with mode 0700)")
    g.add_argument("--client", action="append", metavar="NAME",
                   help="a client to make a key pair for (repeatable; default: one named 'client')")
    g.add_argument("--force", action="store_true", help="overwrite existing key files")
    g.set_defaults(func=cmd_keys_generate)
