"""Peak memory of forge-convert on a DeepSpeed checkpoint: streaming (io/deepspeed_stream.py) against
the whole-model path (consolidate through zero_to_fp32, then save_pretrained), each in a fresh process.

    python bench/convert_memory.py DEEPSPEED_CHECKPOINT [DEEPSPEED_CHECKPOINT ...]

Prints, per checkpoint, the logical fp32 weight bytes and each path's peak resident memory above
the process's baseline after imports: max RSS (``resource.getrusage``; it counts the memory-mapped
partition pages, page cache the kernel can drop) and anonymous RSS (``RssAnon``, sampled), with
their ratios.
"""
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import os, resource, sys, json, threading, time
import torch


def anon_kib():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssAnon:"))


peak_anon, done = [0], threading.Event()


def sample():
    while not done.is_set():
        peak_anon[0] = max(peak_anon[0], anon_kib())
        time.sleep(0.002)
from forge_dist.io import deepspeed_ckpt, deepspeed_stream, forge_format
from forge_dist.io.convert import convert
import deepspeed.utils.zero_to_fp32  # both paths import DeepSpeed (allow-list)
from forge_dist.io.deepspeed_safe import allowed_globals
allowed_globals()
from forge_dist.model.gpt import GPT  # imported by both paths
base, base_anon = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, anon_kib()
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
mode, src, dst = sys.argv[1:4]
if mode == "stream":
    convert(src, dst, "forge")
else:
    model, training = deepspeed_ckpt.load_deepspeed(src)
    forge_format.save_pretrained(model, dst, training=training)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
done.set()
sampler.join()
size = os.path.getsize(os.path.join(dst, forge_format.WEIGHTS_NAME))
print(json.dumps({"above_baseline_kib": peak - base, "anon_kib": peak_anon[0] - base_anon, "weights_bytes": size}))
"""


def run(mode: str, src: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", CHILD, mode, src, os.path.join(tmp, "m")], check=True,
                             capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    for src in sys.argv[1:]:
        whole, stream = run("whole", src), run("stream", src)
        mib = lambda kib: kib / 1024  # noqa: E731
        for key, what in (("above_baseline_kib", "max RSS (mapped file pages included)"),
                          ("anon_kib", "anonymous RSS, sampled every 2 ms")):
            print(f"{src}: weights {stream['weights_bytes'] / 2**20:.1f} MiB; peak {what} above baseline: "
                  f"whole-model {mib(whole[key]):.1f} MiB, streaming {mib(stream[key]):.1f} MiB "
                  f"(x{stream[key] / max(whole[key], 1):.3f})")


if __name__ == "__main__":
    main()
