"""Deterministic batches: each iteration's global batch is a function of (seed, iteration) alone.

Why: parity tests compare a run on D data-parallel ranks with a single process, and a resumed run
with an uninterrupted one. Both hold only if no rank draws its own random numbers (upstream seeds
each rank with seed + rank), and if nothing but the iteration number is needed to resume.

Row layout. Let b = micro_batch_size, G = grad_accum_steps, D = dp_size, so the global batch is
B = b * G * D rows. For training iteration k, a generator seeded by (seed, "train" stream,
split, k) draws B window offsets; the global batch is rows 0 .. B-1 in draw order. Data-parallel
rank r owns the contiguous rows [r*G*b, (r+1)*G*b), and its micro-step m takes

    rows [(r*G + m) * b, (r*G + m + 1) * b)

so micro-step m of rank r in a (D, G) run sees exactly the rows of micro-step r*G + m of a
single process with G' = D*G, and a D-rank run with micro batch b sees, rank after rank, the
rows of one process with micro batch D*b. Tensor- and pipeline-parallel ranks of one replica
pass the same dp_rank and so get the same rows. A row at offset i is x = tokens[i : i+T],
y = tokens[i+1 : i+1+T] (int64), with i uniform in [0, len - T).

Evaluation uses a separate stream seeded by (seed, "eval" stream, split, eval round, step): it
never shifts the training batches, and the same eval round gives the same batches on resume.
An eval batch has b * D rows, sliced by rank like micro-step 0.

Several datasets (``MultiDatasetLoader``, forge-train --dataset_list): iteration k trains on one
dataset, drawn from the sampling probabilities by a generator seeded with (seed, choice stream, k);
its batch is then drawn from that dataset exactly as above.
"""
from __future__ import annotations

import zlib
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from forge_dist.data.dataset import TokenDataset
from forge_dist.data.errors import DataError

STATE_VERSION = 1
_TRAIN_STREAM, _EVAL_STREAM, _CHOICE_STREAM = 0, 1, 2


def _stream(seed: int, stream: int, split: str, *index: int) -> np.random.Generator:
    """A generator that depends only on its arguments (SeedSequence hashes them; stable across runs)."""
    entropy = [seed, stream, zlib.crc32(split.encode("utf-8")), *index]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def draw_offsets(seed: int, stream: int, split: str, index: Tuple[int, ...], count: int,
                 n_tokens: int, block_size: int) -> np.ndarray:
    """``count`` window starts in [0, n_tokens - block_size) for one (stream, split, index)."""
    return _stream(seed, stream, split, *index).integers(0, n_tokens - block_size, size=count, dtype=np.int64)


class BatchLoader:
    """Hands out (x, y) micro-batches for a (dp_rank, micro_step) of any iteration, reproducibly.

    ``splits`` maps split names to TokenDatasets; training reads ``train_split``. All ranks must
    use the same seed, block_size, micro_batch_size, grad_accum_steps and dp_size.
    """

    def __init__(self, splits: Dict[str, TokenDataset], block_size: int, micro_batch_size: int,
                 grad_accum_steps: int = 1, dp_rank: int = 0, dp_size: int = 1, seed: int = 1337,
                 train_split: str = "train", device: Optional[torch.device] = None):
        if min(block_size, micro_batch_size, grad_accum_steps, dp_size) < 1:
            raise DataError("block_size, batch_size, gradient_accumulation_steps and the data-parallel "
                            "size must all be at least 1")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is outside 0 .. {dp_size - 1}")
        if not isinstance(seed, int) or seed < 0:
            raise DataError(f"--seed {seed!r} must be a non-negative integer")
        if train_split not in splits:
            raise DataError(f"no {train_split!r} split to train on (have: {', '.join(splits)})")
        fingerprints = {ds.fingerprint() for ds in splits.values()}
        if len(fingerprints) != 1:
            raise DataError("the splits given to BatchLoader come from different datasets")
        for name, ds in splits.items():
            if len(ds) < block_size + 1:
                raise DataError(f"split {name!r} of {ds.path} has {len(ds)} tokens, fewer than block_size+1 "
                                f"= {block_size + 1}; use a smaller --block_size or more data")
        self.splits, self.train_split = dict(splits), train_split
        self.block_size, self.micro_batch_size = block_size, micro_batch_size
        self.grad_accum_steps, self.dp_rank, self.dp_size = grad_accum_steps, dp_rank, dp_size
        self.seed, self.device = seed, torch.device(device) if device is not None else None
        self.next_iteration = 0
        self._cached: Tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

    @classmethod
    def from_dir(cls, data_dir, block_size: int, micro_batch_size: int, **kwargs) -> "BatchLoader":
        """Open every split of a dataset folder (train, and val when present)."""
        from forge_dist.data.dataset import read_meta

        names = read_meta(data_dir).splits
        splits = {name: TokenDataset.open(data_dir, name) for name in names}
        return cls(splits, block_size, micro_batch_size, **kwargs)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.dp_size

    @property
    def fingerprint(self) -> str:
        return self.splits[self.train_split].fingerprint()

    def tokenizer(self):
        """The dataset's tokenizer (every split shares it)."""
        return self.splits[self.train_split].tokenizer()

    def iteration_offsets(self, iteration: int) -> np.ndarray:
        """The window offsets of the whole global batch of ``iteration`` (all ranks, all micro-steps)."""
        if iteration < 0:
            raise DataError(f"iteration {iteration} must be >= 0")
        if self._cached[0] != iteration:
            ds = self.splits[self.train_split]
            self._cached = (iteration, draw_offsets(self.seed, _TRAIN_STREAM, self.train_split, (iteration,),
                                                    self.global_batch_size, len(ds), self.block_size))
        return self._cached[1]

    def get(self, iteration: int, micro_step: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-batch ``micro_step`` of ``iteration``: x, y of shape (b, T), int64."""
        if not 0 <= micro_step < self.grad_accum_steps:
            raise DataError(f"micro_step {micro_step} is outside 0 .. {self.grad_accum_steps - 1}")
        start = (self.dp_rank * self.grad_accum_steps + micro_step) * self.micro_batch_size
        offsets = self.iteration_offsets(iteration)[start:start + self.micro_batch_size]
        self.next_iteration = max(self.next_iteration, iteration + 1)
        return self._gather(self.splits[self.train_split], offsets)

    def get_eval(self, split: str, eval_round: int, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of eval batch ``step`` in evaluation round ``eval_round`` of ``split``."""
        if split not in self.splits:
            raise DataError(f"cannot evaluate on split {split!r}: the dataset has {', '.join(self.splits)}; "
                            f"prepare it with --val_fraction above 0")
        ds = self.splits[split]
        count = self.micro_batch_size * self.dp_size
        offsets = draw_offsets(self.seed, _EVAL_STREAM, split, (eval_round, step), count, len(ds), self.block_size)
        start = self.dp_rank * self.micro_batch_size
        return self._gather(ds, offsets[start:start + self.micro_batch_size])

    def _gather(self, ds: TokenDataset, offsets: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        rows = ds.tokens[offsets[:, None] + np.arange(self.block_size + 1)].astype(np.int64)  # (b, T+1)
        x, y = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())
        if self.device is not None and self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        if self.device is not None:
            return x.to(self.device), y.to(self.device)
        return x, y

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue with the very next batch (plain values only)."""
        return {"version": STATE_VERSION, "seed": self.seed, "next_iteration": self.next_iteration,
                "global_batch_size": self.global_batch_size, "block_size": self.block_size,
                "train_split": self.train_split, "fingerprint": self.fingerprint,
                "split_tokens": {name: len(ds) for name, ds in sorted(self.splits.items())}}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue a checkpointed stream. The data must be identical; with ``strict`` (resume) the
        global batch and block size must be too, else batches would differ from an unbroken run."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        if state.get("kind") == MultiDatasetLoader.KIND:
            raise DataError(f"the checkpoint trained on several datasets (--dataset_list with "
                            f"{len(state['datasets'])}); resume with the same --dataset_list, or start from "
                            f"the weights with --init_from prev_run")
        if state["fingerprint"] != self.fingerprint:
            raise DataError(f"the dataset changed since the checkpoint (split sizes then "
                            f"{state['split_tokens']}, now {self.state_dict()['split_tokens']}; fingerprint "
                            f"{state['fingerprint']} vs {self.fingerprint}); resume with the same data, or "
                            f"start from the weights with --init_from prev_run")
        if strict:
            for key in ("global_batch_size", "block_size", "train_split"):
                if state[key] != getattr(self, key):
                    raise DataError(f"the checkpoint's loader has {key}={state[key]!r}, this run "
                                    f"{getattr(self, key)!r}; keep batch_size * gradient_accumulation_steps "
                                    f"* data-parallel size and block_size unchanged to resume exactly")
        self.seed, self.next_iteration = int(state["seed"]), int(state["next_iteration"])
        self._cached = (-1, self._cached[1])


def normalized_probs(probs: Optional[Sequence[float]], n: int) -> np.ndarray:
    """Sampling probabilities of ``n`` datasets: uniform for None, else ``probs`` scaled to sum 1
    (relative weights, as upstream's --dataset_sampling_probs)."""
    if probs is None:
        return np.full(n, 1.0 / n)
    p = np.asarray(list(probs), dtype=np.float64)
    if p.shape != (n,):
        raise DataError(f"--dataset_sampling_probs has {p.size} values for {n} datasets in --dataset_list; "
                        f"give one weight per dataset")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise DataError(f"--dataset_sampling_probs {list(probs)} must be non-negative weights with a positive sum")
    return p / p.sum()


def choose_dataset(seed: int, iteration: int, probs: np.ndarray) -> int:
    """The dataset of training iteration ``iteration``: a draw from ``probs`` by a generator seeded
    with (seed, choice stream, iteration) alone, so every rank, and a resumed run, picks the same."""
    u = _stream(seed, _CHOICE_STREAM, "dataset_list", iteration).random()
    return min(int(np.searchsorted(np.cumsum(probs), u, side="right")), len(probs) - 1)


class MultiDatasetLoader:
    """Several prepared datasets trained together (ReaLLM-Forge's multidataset mode, --dataset_list).

    Each training iteration draws one dataset with ``choose_dataset(seed, iteration, probs)``; its
    whole global batch (every rank, every micro-step) comes from that dataset, through a BatchLoader
    per dataset with the usual row layout. The choice, like the rows, is a function of (seed,
    iteration) alone: data-parallel ranks agree without communicating and a resumed run continues
    with the same datasets. ``loaders[i]`` serves dataset i's evaluation batches.
    """

    KIND = "multi"

    def __init__(self, loaders: Sequence[BatchLoader], probs: Optional[Sequence[float]] = None,
                 names: Optional[Sequence[str]] = None):
        if not loaders:
            raise DataError("--dataset_list is empty; name at least one prepared dataset")
        first = loaders[0]
        for ld in loaders[1:]:
            if (ld.global_batch_size, ld.block_size, ld.seed, ld.dp_rank) != \
                    (first.global_batch_size, first.block_size, first.seed, first.dp_rank):
                raise DataError("the loaders of a multi-dataset run must share batch layout and seed")
        self.loaders = list(loaders)
        self.probs = normalized_probs(probs, len(self.loaders))
        self.names = list(names) if names is not None else [str(i) for i in range(len(self.loaders))]
        self.seed = first.seed
        self.next_iteration = 0

    @classmethod
    def from_dirs(cls, data_dirs: Sequence, block_size: int, micro_batch_size: int,
                  probs: Optional[Sequence[float]] = None, names: Optional[Sequence[str]] = None,
                  **kwargs) -> "MultiDatasetLoader":
        return cls([BatchLoader.from_dir(d, block_size, micro_batch_size, **kwargs) for d in data_dirs],
                   probs, names)

    def __len__(self) -> int:
        return len(self.loaders)

    @property
    def global_batch_size(self) -> int:
        return self.loaders[0].global_batch_size

    @property
    def block_size(self) -> int:
        return self.loaders[0].block_size

    def tokenizer(self):
        return self.loaders[0].tokenizer()

    def dataset_index(self, iteration: int) -> int:
        """Which dataset trains iteration ``iteration`` (the LSV index the trainer selects)."""
        if iteration < 0:
            raise DataError(f"iteration {iteration} must be >= 0")
        return choose_dataset(self.seed, iteration, self.probs)

    def get(self, iteration: int, micro_step: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-batch ``micro_step`` of ``iteration``, from that iteration's dataset."""
        x_y = self.loaders[self.dataset_index(iteration)].get(iteration, micro_step)
        self.next_iteration = max(self.next_iteration, iteration + 1)
        return x_y

    def get_eval(self, split: str, eval_round: int, step: int, dataset: int = 0):
        return self.loaders[dataset].get_eval(split, eval_round, step)

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "kind": self.KIND, "seed": self.seed,
                "next_iteration": self.next_iteration, "probs": [float(p) for p in self.probs],
                "names": self.names, "datasets": [ld.state_dict() for ld in self.loaders]}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue a checkpointed multi-dataset stream: the same datasets in the same order and the
        same sampling probabilities (else the iterations would draw other datasets), each dataset
        checked as BatchLoader.load_state_dict does."""
        if state.get("kind") != self.KIND:
            raise DataError("the checkpoint trained on one dataset (--dataset), this run on several "
                            "(--dataset_list); resume with the checkpoint's --dataset, or start from the "
                            "weights with --init_from prev_run")
        saved = state["datasets"]
        if len(saved) != len(self.loaders):
            raise DataError(f"the checkpoint trained on {len(saved)} datasets ({', '.join(state['names'])}), "
                            f"this run has {len(self.loaders)} in --dataset_list ({', '.join(self.names)}); "
                            f"resume with the same --dataset_list")
        if not np.allclose(state["probs"], self.probs, rtol=0, atol=1e-12):
            raise DataError(f"--dataset_sampling_probs changed since the checkpoint (normalised then "
                            f"{state['probs']}, now {[float(p) for p in self.probs]}); keep them to resume "
                            f"exactly, or start from the weights with --init_from prev_run")
        for name, ld, st in zip(self.names, self.loaders, saved):
            try:
                ld.load_state_dict(st, strict=strict)
            except DataError as e:
                raise DataError(f"dataset {name} of --dataset_list: {e}") from None
        self.seed, self.next_iteration = int(state["seed"]), int(state["next_iteration"])
