"""Camera pixels and Prometheus metrics against a real running service (`hetsched start`, the real
SqueezeNet): rgb24/bgr24/nv12/nv21 frames of coffee.jpg through the socket and through shared memory
give espresso; wrong sizes get coded errors; /metrics parses and its counters match `stats`."""

from __future__ import annotations

import re
import urllib.request

import numpy as np
import pytest

from hetsched.client import Client

from .conftest import SHARED_LABELS, SHARED_MODEL, needs_shared, wait_for
from .test_lifecycle import start_service
from .test_pixels import ESPRESSO, av_nv12, nv12_to_nv21, photo
from .test_video import stop_service


@pytest.fixture
def service(tmp_path):
    if not SHARED_MODEL.is_file():
        pytest.skip(f"shared model not present at {SHARED_MODEL}")
    proc, sock, lines = start_service(tmp_path, f"model: {SHARED_MODEL}\nclusters:\n  big: {{cores: [0]}}\n"
                                      f"  little: {{cores: [1]}}\nprofile: {{measure: false}}\n"
                                      f"input: {{labels: {SHARED_LABELS}}}\nserver: {{metrics_port: 0}}\n")
    url = wait_for(lambda: next((m.group(1) for ln in lines if (m := re.search(r"metrics on (\S+)", ln))), None),
                   timeout=30, what="the metrics URL")
    yield sock, url
    stop_service(proc)


def frames():
    rgb = photo("coffee.jpg")
    h, w = rgb.shape[:2]
    nv12 = av_nv12(rgb, "bt601")
    return {"rgb24": (rgb, {}), "bgr24": (np.ascontiguousarray(rgb[:, :, ::-1]), {}),
            "nv12": (nv12, {"width": w, "height": h}), "nv21": (nv12_to_nv21(nv12, w, h), {"width": w, "height": h})}


@needs_shared
@pytest.mark.timeout(240)
def test_every_pixel_encoding_of_coffee_is_espresso_and_wrong_sizes_get_coded_errors(service):
    sock, _ = service
    for shm in (False, True):
        with Client(sock, timeout=60) as c:
            if shm:
                assert c.enable_shm(4, slot_bytes=photo("coffee.jpg").nbytes)
            for enc, (data, kw) in frames().items():
                c.submit(data, stream=enc, encoding=enc, **kw)
            reps = {r["stream"]: r for r in c.replies(4, timeout=60)}
        assert sorted(reps) == ["bgr24", "nv12", "nv21", "rgb24"]
        for enc, r in reps.items():
            assert r["type"] == "result", r
            assert r["top_k"][0]["index"] == ESPRESSO and "espresso" in r["top_k"][0]["label"], (enc, shm)
    with Client(sock, timeout=60) as c:
        c.send_raw([b'{"v":1,"type":"submit","stream":"s","seq":0,"encoding":"nv12","width":64,"height":48}',
                    bytes(100)])                                            # 4608 bytes expected
        c.send_raw([b'{"v":1,"type":"submit","stream":"s","seq":1,"encoding":"rgb24","width":4,"height":4}',
                    bytes(48)])                                             # below min_side
        c.send_raw([b'{"v":1,"type":"submit","stream":"s","seq":2,"encoding":"nv21","width":63,"height":48}',
                    bytes(63 * 48 * 3 // 2)])                               # odd width
        codes = [r.get("code") for r in c.replies(3, timeout=30)]
        assert codes[0] == "SIZE_MISMATCH" and codes[1] == "IMAGE_TOO_SMALL" and codes[2] in ("BAD_IMAGE", "BAD_HEADER")
        rgb, _ = frames()["rgb24"]
        c.submit(rgb, stream="ok", encoding="rgb24")
        assert c.recv(60)["top_k"][0]["index"] == ESPRESSO


@needs_shared
@pytest.mark.timeout(120)
def test_metrics_page_parses_and_matches_stats(service):
    from prometheus_client.parser import text_string_to_metric_families
    sock, url = service
    with Client(sock, timeout=60) as c:
        rgb, _ = frames()["rgb24"]
        for i in range(5):
            c.submit(rgb, stream="m", encoding="rgb24")
        list(c.replies(5, timeout=60))
        st = c.stats()
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    value = lambda fam, suffix="_total", **labels: next(  # noqa: E731
        s.value for s in fams[fam].samples if s.name == fam + suffix and all(s.labels.get(k) == v for k, v in labels.items()))
    assert value("hetsched_frames_accepted") == st["accepted"]
    assert value("hetsched_frames_completed") == st["completed"] >= 5
    assert value("hetsched_busy_refusals") == st["busy"]
    assert value("hetsched_worker_restarts") == st["supervision"]["restarts"]
    assert value("hetsched_frame_latency_seconds", "_count") == st["completed"]
    assert value("hetsched_stage_compute_seconds", "_count", stage="0") == st["completed"]
    assert value("hetsched_plan_generation", "") == st["replan"]["generation"] == 0
    for code, n in st["failed_by_code"].items():
        assert value("hetsched_frames_failed", code=code) == n
