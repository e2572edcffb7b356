"""Peak memory of forge-convert, streaming against the whole-model path, each in a fresh process.

    python bench/convert_memory.py SOURCE [SOURCE ...] [--to forge reallm-forge hf]
    python bench/convert_memory.py --make DIR          # a forge_dist model directory to convert
    python bench/convert_memory.py --prev_run CKPT_PT  # one TP=2 rank's --init_from prev_run read

SOURCE: a DeepSpeed checkpoint, a sharded training checkpoint, a forge_dist model directory, a
ReaLLM-Forge ckpt.pt or a transformers directory (``forge-convert DIR HF --to hf`` of the one --make
writes). Streaming: forge-convert (io/stream_export.py; a DeepSpeed source through
io/deepspeed_stream.py, a transformers one through io/hf/slices.py). Whole-model path: consolidate
(zero_to_fp32) or load_source, then save_pretrained / save_ckpt / save_hf. ``--prev_run``:
io/reallm_forge.py ``open_slices`` (memory-mapped ckpt.pt, the pieces of rank 0 of 2 read: the first
half of every tensor's rows) against load_ckpt (whole).

Prints each path's peak resident memory above the process's baseline after imports: max RSS
(``resource.getrusage``; it counts memory-mapped file pages, page cache the kernel can drop) and
anonymous RSS (``RssAnon``, sampled every 2 ms: the memory the conversion itself holds), with ratios.
"""
import argparse
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
from forge_dist.io import deepspeed_ckpt, deepspeed_stream, forge_format, reallm_forge, stream_export
from forge_dist.io.convert import convert, load_source
from forge_dist.io.hf import save_hf
import deepspeed.utils.zero_to_fp32  # both paths import DeepSpeed (allow-list)
from forge_dist.io.deepspeed_safe import allowed_globals
allowed_globals()
from forge_dist.model.gpt import GPT  # imported by both paths
from forge_dist import ModelConfig
with torch.device("meta"):  # a model's first build imports its modules (~75 MB): in the baseline of both paths
    GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=16, use_rotary_embeddings=True,
                    use_abs_pos_embeddings=False, mlp_variant="swiglu", activation_variant="silu"))
mode, to, src, dst = sys.argv[1:5]
if mode == "stream" and to == "reallm-forge":
    dst = os.path.join(dst, "ckpt.pt")
base, base_anon = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, anon_kib()
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
if to == "prev_run" and mode == "stream":
    from forge_dist.io.slice_read import load_slices
    cfg, reader = reallm_forge.open_slices(src)
    wanted = {}
    for n in reader.names():
        shape = reader.shape(n)
        if reader.stored(n) == n and shape:
            view = torch.empty((max(shape[0] // 2, 1), *shape[1:]))
            wanted[n] = [(view, (0,) * len(shape))]
    reader.read(wanted)
    size = reader.bytes_read
elif to == "prev_run":
    model, _ = reallm_forge.load_ckpt(src)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
elif mode == "stream":
    convert(src, dst, to)
elif to == "forge":
    load = deepspeed_ckpt.load_deepspeed if deepspeed_ckpt.is_deepspeed_checkpoint(src) else load_source
    model, training = load(src)
    forge_format.save_pretrained(model, dst, training=training)
else:
    model, training = load_source(src)
    if to == "hf":
        save_hf(model, dst)
    else:
        reallm_forge.save_ckpt(model, os.path.join(dst, "ckpt.pt"), training=training)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
done.set()
sampler.join()
if to != "prev_run":
    size = sum(os.path.getsize(os.path.join(dst if os.path.isdir(dst) else os.path.dirname(dst), f))
               for f in os.listdir(dst if os.path.isdir(dst) else os.path.dirname(dst)))
print(json.dumps({"above_baseline_kib": peak - base, "anon_kib": peak_anon[0] - base_anon, "bytes": size}))
"""


def run(mode: str, to: str, src: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", CHILD, mode, to, src, os.path.join(tmp, "m")], check=True,
                             capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def make(directory: str) -> None:
    """A Llama-shaped GPT (every target can express it), 6 x 512, vocab 8192: 88 MiB of fp32 weights."""
    import torch

    from forge_dist import ModelConfig
    from forge_dist.io import save_pretrained
    from forge_dist.model.gpt import GPT

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=6, n_head=8, n_embd=512, block_size=256, vocab_size=8192, use_rotary_embeddings=True,
                      use_abs_pos_embeddings=False, mlp_variant="swiglu", activation_variant="silu")
    save_pretrained(GPT(cfg), directory, training={"iter_num": 1})
    print(f"wrote {directory}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="*")
    p.add_argument("--to", nargs="+", default=["forge"], choices=["forge", "reallm-forge", "hf"])
    p.add_argument("--make", default=None, help="write a forge_dist model directory here and stop")
    p.add_argument("--prev_run", default=None, help="a ReaLLM-Forge ckpt.pt: one TP=2 rank's prev_run read")
    args = p.parse_args()
    if args.make:
        return make(args.make)
    jobs = [(src, to) for src in args.sources for to in args.to] + ([(args.prev_run, "prev_run")] if args.prev_run else [])
    mib = lambda kib: kib / 1024  # noqa: E731
    for src, to in jobs:
        whole, stream = run("whole", to, src), run("stream", to, src)
        what = "read" if to == "prev_run" else "written"
        print(f"{src} --to {to}: {stream['bytes'] / 2**20:.1f} MiB {what} (whole path: {whole['bytes'] / 2**20:.1f})")
        for key, label in (("above_baseline_kib", "max RSS (mapped file pages included)"),
                           ("anon_kib", "anonymous RSS, sampled every 2 ms")):
            print(f"  peak {label} above baseline: whole-model {mib(whole[key]):.1f} MiB, streaming "
                  f"{mib(stream[key]):.1f} MiB (x{stream[key] / max(whole[key], 1):.3f})")


if __name__ == "__main__":
    main()
