"""``python -m tests.helpers.watched_train REPORT key=value ...``: the trainer's command line
(:func:`gti_jax.train.__main__.main`) with the export's device memory recorded in REPORT.

For the multi-process test: at the start of the export and at every tensor's gather (while
the gathered copy is alive) it records, for this process's devices, the bytes of every live
array on the fullest device (``jax.live_arrays()``), and the sizes that bound them: the
model's largest tensor and the whole model. A trainer that gathered the whole model would
show it on a device; the streamed export adds one tensor.

With ``--reexport SRC OUT DTYPE`` it then loads the checkpoint directory SRC onto the run's
mesh and exports it again to OUT in DTYPE (``export_hf_dir``, every process taking part),
so two layouts can be compared on exactly the same parameters.
"""

from __future__ import annotations

import json
import sys
from collections import Counter


def device_bytes() -> int:
    """The bytes of live arrays on this process's fullest device, each buffer once (a shard
    read through ``addressable_shards`` is itself a live array on the parent's buffer)."""
    import jax

    per, seen = Counter(), set()
    for a in jax.live_arrays():
        for shard in a.addressable_shards:
            key = (shard.device, shard.data.unsafe_buffer_pointer())
            if key not in seen:
                seen.add(key)
                per[shard.device] += shard.data.nbytes
    return max(per.values(), default=0)


def watch(report: dict) -> None:
    """Wraps the export and the gather to fill `report` (see the module docstring); calls
    no jax function (the trainer initializes ``jax.distributed`` first)."""
    from flax import nnx

    import gti_jax.models as models
    from gti_jax.models import sharding

    real_export, real_replicate = models.export_hf_dir, sharding._replicate

    def export(model, *args, **kwargs):
        sizes = [v[...].nbytes for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
        report.update(model_bytes=sum(sizes), largest_tensor_bytes=max(sizes))
        report.update(start_bytes=device_bytes(), gathers=[])
        return real_export(model, *args, **kwargs)

    def replicate(x):
        whole = real_replicate(x)
        if "gathers" in report:
            report["gathers"].append([whole.addressable_shards[0].data.nbytes, device_bytes()])
        return whole

    models.export_hf_dir = export
    sharding._replicate = replicate


def reexport(src: str, out: str, dtype: str, cfg_args: list[str]) -> None:
    """Loads `src` onto the run's mesh and exports it to `out` (every process)."""
    import jax.numpy as jnp

    from gti_jax.models import load_pretrained
    from gti_jax.models.hf import export_hf_dir
    from gti_jax.models.sharding import make_mesh
    from gti_jax.train.config import load_config

    cfg = load_config(None, cfg_args)
    mesh = make_mesh(dict(cfg.mesh.shape))
    model, tok = load_pretrained(src, mesh=mesh, rules=dict(cfg.mesh.rules))
    export_hf_dir(model, None, tok, out, dtype=getattr(jnp, dtype))


def main(argv: list[str]) -> int:
    report_path, args = argv[0], argv[1:]
    extra = None
    if "--reexport" in args:
        i = args.index("--reexport")
        extra, args = args[i + 1 : i + 4], args[:i] + args[i + 4 :]
    report: dict = {}
    watch(report)
    from gti_jax.train.__main__ import main as train

    code = train(args)
    import jax

    report["process"] = jax.process_index()
    with open(report_path, "w") as f:  # the trainer's export only
        json.dump(report, f)
    if code == 0 and extra is not None:
        reexport(*extra, [a for a in args if a.startswith("mesh.")])
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
