"""Streamed datasets (jaxyolo.data.stream): the same batches as the decoded
splits, unreadable images, worker processes, the cache choice, default M."""

import dataclasses
import json
import sys

import numpy as np
import pytest
from _datasets import make_coco_dataset, make_yaml_dataset

from jaxyolo.data.decode import PAD_VALUE, decode_image, letterbox
from jaxyolo.data.formats import discover
from jaxyolo.data.images import load_split
from jaxyolo.data.pipeline import TrainBatches, eval_batches
from jaxyolo.data.stream import RAM_FRACTION, DecodePool, choose_cache, open_split
from jaxyolo.train.loop import default_max_boxes

S = 64


def _assert_same(a: dict, b: dict, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype, (what, k)
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what}: {k}")


@pytest.fixture(scope="module")
def yaml_spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    path, _ = make_yaml_dataset(root, n_train=21, n_val=5)
    return discover(path, "train")


@pytest.mark.parametrize("cache,workers,buffer,ring", [("none", 2, 0, 128), ("ram", 1, 0, 0), ("ram", 0, 0, 0), ("none", 1, 2, 40)])
def test_streamed_batches_equal_decoded_batches(yaml_spec, cache, workers, buffer, ring):
    """Pixels, rects and padded labels of every batch (mosaic or not, two
    epochs, eval order) equal those of the split decoded up front; also with
    mosaic_buffer and a ring small enough that frames are evicted and reused."""
    ref = load_split(yaml_spec, img_size=S)
    with DecodePool(workers) as pool:
        data = open_split(yaml_spec, img_size=S, pool=pool, cache=cache, ring=ring)
        assert data.img_size == S and len(data) == len(ref) == 22 and data.max_objects() == ref.max_objects() == 3
        decoded = TrainBatches(ref, batch_size=8, max_boxes=4, seed=3, mosaic_buffer=buffer)
        streamed = TrainBatches(data, batch_size=8, max_boxes=4, seed=3, mosaic_buffer=buffer)
        positions = [(e, k) for e in range(2) for k in range(decoded.steps_per_epoch)]
        mosaic_of = lambda e: e == 0  # noqa: E731
        got = list(streamed.stream(positions, mosaic_of=mosaic_of, ahead=2))
        assert [p for p, _ in got] == positions
        for pos, batch in got:
            _assert_same(decoded.batch(*pos, mosaic=mosaic_of(pos[0])), batch, pos)
        assert got[0][1]["image"].shape == (8, 4, S, S, 3) and got[-1][1]["image"].shape == (8, 1, S, S, 3)
        _assert_same(decoded.batch(1, 1, mosaic=True), streamed.batch(1, 1, mosaic=True), "batch()")
        for (x, n), (y, m) in zip(eval_batches(ref, batch_size=8, max_boxes=4), eval_batches(data, batch_size=8, max_boxes=4), strict=True):
            assert n == m
            _assert_same(x, y, "eval")
        for a, b in zip(ref.labels, data.labels, strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(data.images.rects, ref.content)
        np.testing.assert_array_equal(data.images.orig_shapes, ref.orig_shapes)
        assert data.failed == {} and data.images.take_failures() == []
        data.close()


def test_streamed_coco_split_and_labels_of_undecoded_images(tmp_path):
    """COCO (declared sizes): the same frames and labels; an image this
    process never decoded gets its labels' rect from its header."""
    json_path, _ = make_coco_dataset(tmp_path, n=6)
    spec = discover(json_path, "val", images=tmp_path / "val2017")
    ref = load_split(spec, img_size=S)
    with DecodePool(1) as pool:
        data = open_split(spec, img_size=S, pool=pool, cache="none", ring=8)
        for a, b in zip(ref.labels, data.labels, strict=True):  # nothing decoded yet: headers only
            np.testing.assert_array_equal(a, b)
        assert not data.images.known.any()
        np.testing.assert_array_equal(data.images[np.arange(6)], ref.images)
        data.close()


def test_unreadable_images_are_empty_frames_reported_once(tmp_path):
    """A truncated JPEG and a too-small image found mid-epoch: grey frame,
    no labels, no crash; each reported once; left out of the eval labels."""
    path, out = make_yaml_dataset(tmp_path, n_train=10, n_val=2)
    files = out["train"][0]
    jpg = next(f for f in files if f.suffix == ".jpg")
    jpg.write_bytes(jpg.read_bytes()[:300])  # the header reads, the pixels do not
    png = next(f for f in files if f.suffix == ".png")
    from PIL import Image

    Image.new("RGB", (9, 40)).save(png)  # < 10 px: upstream's check_image refuses it
    spec = discover(path, "train")
    bad = {spec.files.index(jpg), spec.files.index(png)}
    for cache in ("ram", "none"):
        with DecodePool(1) as pool:
            data = open_split(spec, img_size=S, pool=pool, cache=cache, ring=64)
            tb = TrainBatches(data, batch_size=11, max_boxes=4, seed=0)
            for e in range(2):
                batch = tb.batch(e, 0, mosaic=True)
                idx = tb.indices(e, 0, mosaic=True)
                is_bad = np.isin(idx, list(bad))
                assert is_bad.any()
                assert np.all(batch["image"][is_bad] == PAD_VALUE) and not batch["mask"][is_bad].any()
                np.testing.assert_array_equal(batch["rects"][is_bad], np.broadcast_to([0, 0, S, S], (is_bad.sum(), 4)))
                assert not np.any(batch["boxes"][is_bad]) and batch["mask"][~is_bad].any()
                good = idx[~is_bad][0]
                np.testing.assert_array_equal(batch["image"][~is_bad][0], letterbox(decode_image(spec.files[good]), S)[0])
                failures = data.images.take_failures()
                if e == 0:
                    assert sorted(f for f, _ in failures) == sorted(map(str, (jpg, png)))
                    reasons = dict(failures)
                    assert "truncated" in reasons[str(jpg)].lower() and "< 10 pixels" in reasons[str(png)]
                else:
                    assert failures == []  # reported once, never decoded again
            assert set(data.failed) == bad and all(len(data.labels[i]) == 0 for i in bad)
            data.close()


def test_a_dead_worker_is_replaced_and_a_dying_one_stops_the_run(yaml_spec, monkeypatch):
    with DecodePool(1) as pool:
        data = open_split(yaml_spec, img_size=S, pool=pool, cache="none", ring=8)
        data.images[np.arange(3)]
        pool._procs[0].kill()  # e.g. the OOM killer
        pool._procs[0].wait()
        frames, _, ok = data.images.collect(data.images.request(np.arange(3, 6)))
        assert ok.tolist() == [False, True, True]  # the image in the dead worker's hands is lost
        assert "worker died" in data.failed[3]
        for f, i in zip(frames[1:], (4, 5)):  # its replacement decodes the rest
            np.testing.assert_array_equal(f, letterbox(decode_image(yaml_spec.files[i]), S)[0])
        data.close()
    import subprocess

    monkeypatch.setattr(DecodePool, "_spawn", staticmethod(lambda: subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)))
    with DecodePool(1) as pool:
        data = open_split(yaml_spec, img_size=S, pool=pool, cache="none", ring=8)
        with pytest.raises(RuntimeError, match="died 3 times in a row"):
            data.images[np.arange(4)]
        data.close()


def test_workers_outlive_sigint_and_sigterm(yaml_spec):
    """Ctrl-C and a VM's shutdown signal every process: the decode workers
    keep decoding for the steps the trainer runs until it stops
    (jaxyolo.train.preempt), and end when their stdin closes."""
    import signal
    import time

    with DecodePool(1) as pool:
        data = open_split(yaml_spec, img_size=S, pool=pool, cache="none", ring=8)
        data.images[np.arange(2)]
        proc = pool._procs[0]
        for sig in (signal.SIGINT, signal.SIGTERM):
            proc.send_signal(sig)
        time.sleep(0.5)
        frames, _, ok = data.images.collect(data.images.request(np.arange(2, 5)))
        assert ok.all() and proc.poll() is None and pool._procs[0] is proc  # the same worker, alive
        for f, i in zip(frames, (2, 3, 4)):
            np.testing.assert_array_equal(f, letterbox(decode_image(yaml_spec.files[i]), S)[0])
        data.close()
    assert proc.wait(timeout=10) == 0  # closed by the pool


def test_choose_cache():
    gb = 2**30
    n = 1000  # x 640 x 640 x 3 = 1.14 GiB decoded
    assert choose_cache("auto", n_images=n, img_size=640, memory=4 * gb)[0] == "ram"
    mode, why = choose_cache("auto", n_images=n, img_size=640, memory=2 * gb)
    assert mode == "none" and why == f"1.14 GB decoded exceeds {RAM_FRACTION:.0%} of 2.0 GB available"
    assert choose_cache("disk", n_images=n, img_size=640) == ("disk", "as asked")
    with pytest.raises(ValueError, match="cache must be one of auto, ram, disk, none, got 'mmap'"):
        choose_cache("mmap", n_images=n, img_size=640)


def test_default_max_boxes_keeps_every_box(tmp_path):
    """A 70-object image: M defaults to 72 and the batch holds all 70."""
    path, out = make_yaml_dataset(tmp_path, n_train=4, n_val=1)
    label = tmp_path / "labels" / "train" / "im001.txt"
    rng = np.random.default_rng(0)
    rows = [f"{i % 3} {x:.4f} {y:.4f} 0.05 0.05\n" for i, (x, y) in enumerate(rng.uniform(0.1, 0.9, (70, 2)))]
    label.write_text("".join(rows))
    spec = discover(path, "train")
    with DecodePool(0) as pool:
        data = open_split(spec, img_size=S, pool=pool, cache="ram")
        assert data.max_objects() == 70 and default_max_boxes(data) == 72
        tb = TrainBatches(data, batch_size=5, max_boxes=default_max_boxes(data), seed=0)
        batch = tb.batch(0, 0)
        assert sorted(batch["mask"].sum(-1).ravel().tolist())[-1] == 70
        data.close()
    assert default_max_boxes(type("D", (), {"max_objects": lambda self: 9})()) == 32  # the embedded set: 32 as before


@pytest.mark.slow
def test_streamed_run_resumes_identically_with_other_workers(tmp_path):
    """A run streamed by 2 workers, stopped and resumed with the frames kept
    in RAM and decoded in-process, has the losses of one uninterrupted run
    (batch k of epoch e depends on (seed, e, k) only); the corrupt JPEG is a
    warning, the 70-object image keeps its boxes (M = 72 saved in the config)."""
    from jaxyolo.train import TrainConfig, train

    path, out = make_yaml_dataset(tmp_path / "data", n_train=19, n_val=3)
    rng = np.random.default_rng(0)
    (tmp_path / "data" / "labels" / "train" / "im001.txt").write_text(
        "".join(f"{i % 3} {x:.4f} {y:.4f} 0.05 0.05\n" for i, (x, y) in enumerate(rng.uniform(0.1, 0.9, (70, 2)))))
    jpg = next(f for f in out["train"][0] if f.suffix == ".jpg")
    jpg.write_bytes(jpg.read_bytes()[:300])
    cfg = TrainConfig(data=str(path), img_size=S, batch=4, epochs=2, warmup_min_steps=2, eval_every=2, max_steps=7)
    messages = []
    full = train(cfg, tmp_path / "full", progress=False, log=messages.append, cache="ram", workers=1, header="run")
    assert messages[0] == "run  data: cache=ram, 1 decode worker"
    assert json.loads((tmp_path / "full" / "config.json").read_text())["max_boxes"] == 72
    assert sum(f"{jpg.name} (OSError: Truncated File Read)" in m for m in messages) == 1, messages
    part = train(dataclasses.replace(cfg, max_steps=3), tmp_path / "part", progress=False, log=lambda *_: None, cache="none", workers=2)
    rest = train(cfg, tmp_path / "part", resume=True, progress=False, log=lambda *_: None, cache="ram", workers=0)
    assert part["losses"] + rest["losses"] == full["losses"] and len(full["losses"]) == 7


def test_shared_buffers_leave_nothing_behind_a_killed_run(yaml_spec):
    """The frame buffers are unlinked when made: no file in /dev/shm (or the
    temp folder) while a run streams, none after it is SIGKILLed, and its
    workers end with it."""
    import glob
    import os
    import subprocess
    import tempfile
    import time

    def ours(pid):  # the buffer files of process pid (their names carry it)
        return glob.glob(f"/dev/shm/jaxyolo-frames-{pid}-*") + glob.glob(os.path.join(tempfile.gettempdir(), f"jaxyolo-frames-{pid}-*"))

    code = f"""
import os, signal, sys
from jaxyolo.data.formats import discover
from jaxyolo.data.stream import DecodePool, open_split
pool = DecodePool(1)
data = open_split(discover(sys.argv[1], "train"), img_size={S}, pool=pool, cache="ram")
data.images[list(range(5))]
print(pool._procs[0].pid, flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGKILL)
"""
    child = subprocess.Popen([sys.executable, "-c", code, str(_yaml_of(yaml_spec))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    worker = int(child.stdout.readline())
    assert ours(child.pid) == []  # streaming: no named buffer file
    child.stdin.write("\n")
    child.stdin.flush()
    assert child.wait(timeout=30) == -9
    for _ in range(100):  # the worker sees its stdin close and ends
        if not os.path.exists(f"/proc/{worker}"):
            break
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{worker}") or open(f"/proc/{worker}/stat").read().split()[2] == "Z"
    assert ours(child.pid) == []


def test_a_buffer_the_workers_cannot_open_stops_with_the_reason(tmp_path):
    for workers in (0, 1):
        with DecodePool(workers) as pool:
            fut = pool.submit((str(tmp_path / "gone.u8"), 4, 0, str(tmp_path / "x.jpg"), None, S))
            with pytest.raises(RuntimeError, match="image decoding cannot run: cannot open the shared frame buffer .*gone.u8"):
                fut.result(timeout=30)


def _yaml_of(spec):
    """The data.yaml a spec came from (its files live in <root>/images/train)."""
    from pathlib import Path

    return Path(spec.files[0]).parents[2] / "data.yaml"


def test_mosaic_buffer_draws_recent_samples_and_saves_decodes(tmp_path):
    """mosaic_buffer=W: the 3 others of batch k are samples of batches
    k-W+1..k (a function of (seed, epoch, k)); streamed with a ring that
    holds them, an epoch of mosaics decodes each image about once, against
    about 3.5 times with others drawn from the whole dataset."""
    n, b = 200, 4
    path, _ = make_yaml_dataset(tmp_path, n_train=n - 1, n_val=1)
    spec = discover(path, "train")
    decodes = {}
    for w in (0, 3):
        with DecodePool(0) as pool:
            data = open_split(spec, img_size=32, pool=pool, cache="none", ring=3 * b * 4 + w * b)  # as train() sizes it
            submit = data.images._submit
            count = []
            data.images._submit = lambda i, row: (count.append(i), submit(i, row))[1]
            tb = TrainBatches(data, batch_size=b, max_boxes=4, seed=0, mosaic_buffer=w)
            perm = np.random.default_rng([0, 1]).permutation(n)
            for k in range(tb.steps_per_epoch):
                idx = tb.indices(1, k, mosaic=True)
                np.testing.assert_array_equal(idx[:, 0], perm[k * b : (k + 1) * b])
                if w:
                    assert set(idx[:, 1:].ravel()) <= set(perm[max(0, k - w + 1) * b : (k + 1) * b])
            for _ in tb.stream(((1, k) for k in range(tb.steps_per_epoch)), mosaic_of=lambda e: True, ahead=1):
                pass
            decodes[w] = len(count)
            data.close()
    assert decodes[3] == n and decodes[0] >= 2.5 * n, decodes
