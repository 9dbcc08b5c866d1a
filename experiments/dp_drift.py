"""How far apart do two training runs drift when only rounding differs?

    python experiments/dp_drift.py            # 4 CPU devices, the tests' tiny config

Runs the first ``--steps`` steps of the tests' tiny config (pico, 64 px,
batch 8, AdamW, the default augmentations) and prints the relative
difference of each step's loss between

- 4 devices (data parallel) and 1 device, from the same initial state;
- 1 device and 1 device with half the initial parameters moved by one ulp
  (``--draws`` random choices of the half).

Both start from states equal to float32 rounding; the second pair differs
by nothing but that rounding, so it shows how much the training itself
amplifies rounding.  The data-parallel step as such is exact to ~1e-6 at
every step (``tests/test_train_loop.py``); the drift of whole runs is the
dynamics.  On a CPU the devices are XLA's virtual host devices.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--draws", type=int, default=3)
    args = p.parse_args(argv)
    if "jax" not in sys.modules:  # virtual CPU devices must be asked for before JAX starts
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    import jax
    import numpy as np

    from jaxyolo import parallel
    from jaxyolo.data import TrainBatches, load_embedded
    from jaxyolo.train import Session, TrainConfig

    if len(jax.devices()) < args.devices:
        raise SystemExit(f"error: {args.devices} devices asked for, {len(jax.devices())} available")
    cfg = TrainConfig(img_size=64, batch=8, epochs=1, train_size=64, val_size=8, max_boxes=8, warmup_min_steps=2)
    data = load_embedded("train", img_size=cfg.img_size, size=cfg.train_size)
    batches = TrainBatches(data, batch_size=cfg.batch, max_boxes=cfg.max_boxes, seed=cfg.seed)
    if args.steps > batches.steps_per_epoch:
        raise SystemExit(f"error: --steps at most {batches.steps_per_epoch} (one epoch)")
    sessions = {n: Session(cfg, nc=data.nc, steps_per_epoch=batches.steps_per_epoch, mesh=parallel.make_mesh(n), log_every=1) for n in (1, args.devices)}
    start = jax.device_get((sessions[1].state, sessions[1].ema))

    def losses(n, state, ema):
        s = sessions[n]
        state, ema = jax.device_put((state, ema), s.replicated)
        out = []
        for k in range(args.steps):
            batch = jax.device_put(batches.batch(0, k, mosaic=cfg.mosaic_in_epoch(0)), s.batch_sharding)
            state, ema, acc = s.train_step(state, ema, s.new_acc(), batch)
            out.append(float(acc["last"]["loss"]))
        return np.array(out)

    def show(label, a, b):
        print(f"{label:<44}" + " ".join(f"{v:8.1e}" for v in np.abs(a - b) / np.abs(b)))

    print(f"jax {jax.__version__} on {jax.default_backend()}; relative loss difference at steps 1..{args.steps}")
    one = losses(1, *start)
    show(f"{args.devices} devices vs 1 device", losses(args.devices, *start), one)
    for draw in range(args.draws):
        rng = np.random.default_rng(draw)
        state = dict(start[0])
        state["params"] = jax.tree.map(lambda x: np.where(rng.random(x.shape) < 0.5, np.nextafter(x, np.float32(np.inf)), x), start[0]["params"])
        show(f"1 device, 1 ulp on half the params (draw {draw})", losses(1, state, start[1]), one)
    return 0


if __name__ == "__main__":
    sys.exit(main())
