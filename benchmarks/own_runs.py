"""Your own training run recorded by lmdynamics.record: the callback's cost and the disk it saves.

One run trains the same small GPT-NeoX twice with a real ``transformers.Trainer`` on the CPU
(as tests/test_record.py: random token sequences, labels = inputs, dropout 0.1, AdamW,
``--steps`` S optimizer steps of ``--batch`` sequences, seed 0 for the model and the Trainer),
in this order:

- **run A**, without the callback, saving a Trainer checkpoint every K steps
  (``save_steps`` = ``--every`` K: the folders ``checkpoint-K``, ``checkpoint-2K``, ...,
  ``checkpoint-S``, each with the weights, the optimizer state, the scheduler, the RNG states);
- **run B**, with ``lmdynamics.record.TrainerCallback(config, every=K)`` (steps 0, K, 2K, ...
  and S recorded; step 0's weights saved by the callback at ``local.path``), saving the final
  checkpoint only (``save_steps`` = S).

and prints, as markdown:

1. **Callback cost.** Two timing callbacks of this script sit first and last in the Trainer's
   callback list (after the Trainer's own), around lmdynamics' callback, and stamp
   ``time.perf_counter()`` at ``on_train_begin``, ``on_step_end`` and ``on_save``. A
   **training step**'s wall time is the interval from the last stamp before it to the first
   stamp of its ``on_step_end`` (the batch fetch, forward, backward, optimizer and scheduler
   step; no checkpoint save, no recording); the reference is the **median training step of
   run A**. A **record**'s extra wall time is the interval between the first and the last
   stamp of the same event in run B (everything lmdynamics' callback does in that step,
   synchronously: the copy of the model, the extraction pass, the store's writing). Each is
   given as a ratio to the reference step. Step 0's record (``on_train_begin``) is reported
   apart: it is the first in the process (whatever is done once: the extraction code itself
   is imported with ``lmdynamics.record``, before any timing) and includes the step-0
   checkpoint (timed alone, by wrapping ``Recorder.save_initial``, and left out); the callback's
   construction (the config read and checked, the eval batch read) is timed too. Also: the
   training steps of run B, those right after a record and the others, against run A's (an
   indirect cost would show there); one Trainer checkpoint save (``on_step_end`` to
   ``on_save`` in run A) in training steps; and the run's wall time with recording over
   without it, as the sum of its training steps and records over the sum of its training
   steps (run B's own steps).
2. **Disk**, from the files the two runs wrote (``os.stat``'s ``st_size``, summed over a
   folder's files; the space allocated, ``st_blocks`` x 512, in brackets): one Trainer
   checkpoint folder of run A (per file, and its weights file alone) against one recorded
   store (the zarr directory); then run A's checkpoint folders (every K steps) against run
   B's step-0 folder, final checkpoint and recorded stores. An extrapolation to Pythia
   shapes follows, **arithmetic, not measured**: a checkpoint of 12 bytes per parameter
   (float32 weights and AdamW's two moments; this run's measured bytes per parameter are
   printed beside it) times the shape's parameters, and :func:`lmdynamics.plan.store_bytes`
   (the plan's uncompressed estimate of a store: activations and spectra, no Conjecture
   statistics) for ``--plan-tokens`` tokens.
3. **Bit-identity**: run A's and run B's final weights, ``torch.equal`` on every tensor of the
   state dict, and their final checkpoints' ``model.safetensors`` byte for byte; a "no" makes
   the script exit with status 1.

The recording's config (a ``source: local`` workflow config, in the temporary folder) is
tests/test_record.py's: ``tokens`` 64, ``hub.sequences`` 4 eval sequences of ``eval_data.seq_len``
33 tokens, the extraction defaults, Conjecture statistics on (``--no-conjecture``: off). The
shape: ``--shape tiny`` (test_record's: hidden 32, 2 layers, 4 heads, MLP 128, vocabulary 64)
or ``--shape small`` (hidden 128, 4 layers, 4 heads, MLP 512, vocabulary 64). Threads: pinned
as bench.py pins them (:func:`lmdynamics.threads.pin_threads`, ``--threads``, default every
core), before numpy and torch load. Everything is written under a temporary folder (``--root``
names another one, kept; never inside the repository).

    python benchmarks/own_runs.py                    # tiny shape, S=60, every 10 (~15 s)
    python benchmarks/own_runs.py --quick            # S=12, every 4 (~10 s)
    python benchmarks/own_runs.py --shape small --no-conjecture
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

from lmdynamics.threads import THREAD_VARIABLES, pin_threads


def _threads_argument(argv: list[str]) -> int:
    """``--threads`` of the command line, before numpy and torch load (default: every core)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    known, _ = p.parse_known_args(argv)
    return known.threads


pin_threads(_threads_argument(sys.argv[1:]))

import numpy as np  # noqa: E402  (after pin_threads: thread variables are read at load)
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    Trainer,
    TrainingArguments,
)

from lmdynamics.interventions.machine import machine_facts  # noqa: E402
from lmdynamics.plan import store_bytes  # noqa: E402
from lmdynamics.record import TrainerCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
transformers.utils.logging.disable_progress_bar()  # save_pretrained's shard bars, on stderr
#: hidden, layers, heads, MLP width, vocabulary; tiny: tests/test_record.py's.
SHAPES = {"tiny": (32, 2, 4, 128, 64), "small": (128, 4, 4, 512, 64)}
#: Pythia architectures (hidden, layers, heads; vocabulary 50304, MLP 4x, untied) for the
#: arithmetic extrapolation.
PYTHIA = {"70m": (512, 6, 8), "160m": (768, 12, 12), "1.4b": (2048, 24, 16)}
TRAIN_SEQ = 32
EVAL = {"tokens": 64, "sequences": 4, "seq_len": 33}


# ------------------------------------------------------------------------------ machine

def machine() -> str:
    """CPU model, cores, torch and transformers versions and threads, date, load average."""
    cpu = machine_facts("cpu")["cpu"] or "unknown CPU"
    pinned = ", ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", *THREAD_VARIABLES)
                       if k in os.environ)
    return (f"{datetime.datetime.now().isoformat(timespec='minutes')}; CPU {cpu}, "
            f"{os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()}"
            f" threads ({torch.get_num_interop_threads()} inter-op; {pinned or 'not pinned'}),"
            f" transformers {transformers.__version__}; load average {load():.2f} at start")


def load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


# ----------------------------------------------------------------------------- training

class Tokens(torch.utils.data.Dataset):
    """Random token sequences (labels = inputs), as tests/test_record.py's."""

    def __init__(self, vocab: int, n: int):
        self.x = torch.as_tensor(np.random.default_rng(1).integers(0, vocab, size=(n, TRAIN_SEQ)))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


class Clock(transformers.TrainerCallback):
    """Appends ``(name, event, step, perf_counter())`` to a shared list at the events that
    bound a step."""

    name = "clock"

    def __init__(self, stamps: list):
        self.stamps = stamps

    def _stamp(self, event: str, state) -> None:
        self.stamps.append((self.name, event, state.global_step, time.perf_counter()))

    def on_train_begin(self, args, state, control, **kwargs):
        self._stamp("begin", state)

    def on_step_end(self, args, state, control, **kwargs):
        self._stamp("step", state)

    def on_save(self, args, state, control, **kwargs):
        self._stamp("save", state)


class FirstClock(Clock):
    """The first of this script's callbacks (a class of its own: the Trainer warns of two
    callbacks of one class)."""

    name = "first"


class LastClock(Clock):
    """The last callback."""

    name = "last"


def model_config(shape: str) -> GPTNeoXConfig:
    hidden, layers, heads, mlp, vocab = SHAPES[shape]
    return GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, intermediate_size=mlp,
                         max_position_embeddings=max(64, TRAIN_SEQ, EVAL["seq_len"]),
                         hidden_dropout=0.1, attention_dropout=0.1)


def train(a: argparse.Namespace, out: Path, *, save_steps: int, callbacks=()) -> dict:
    """One Trainer run; its final state dict, its stamps, its ``train()`` wall time."""
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(model_config(a.shape))
    args = TrainingArguments(output_dir=str(out), max_steps=a.steps,
                             per_device_train_batch_size=a.batch, learning_rate=3e-3,
                             save_strategy="steps", save_steps=save_steps, report_to=[],
                             use_cpu=True, logging_steps=10**9, disable_tqdm=True, seed=0)
    stamps: list = []
    trainer = Trainer(model=model, args=args,
                      train_dataset=Tokens(model.config.vocab_size, a.steps * a.batch),
                      callbacks=[FirstClock(stamps), *callbacks, LastClock(stamps)])
    trainer.remove_callback(transformers.PrinterCallback)  # its final log line, on stdout
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "stamps": stamps, "wall": wall,
            "params": sum(p.numel() for p in model.parameters())}


def intervals(stamps: list, recorded: set[int] = frozenset()) -> dict[str, dict[int, float]]:
    """From the stamps: ``step`` (training step t: the last stamp before it to the first
    stamp of its on_step_end), ``record`` (on_train_begin, and on_step_end of a step in
    ``recorded``: first to last stamp), ``save`` (the last on_step_end stamp to the first
    on_save stamp)."""
    out: dict[str, dict[int, float]] = {"step": {}, "record": {}, "save": {}}
    prev = first = None
    for name, event, step, t in stamps:
        if name == "first":
            if event == "step":
                out["step"][step] = t - prev
            elif event == "save":
                out["save"][step] = t - prev
            first = t
        elif event == "begin" or (event == "step" and step in recorded):
            out["record"][step] = t - first
        prev = t
    return out


# --------------------------------------------------------------------------------- disk

def files_of(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def size(path: Path) -> tuple[int, int, int]:
    """(sum of st_size, sum of st_blocks x 512, files) of a file or a folder's files."""
    stats = [f.stat() for f in files_of(path)]
    return sum(s.st_size for s in stats), sum(s.st_blocks * 512 for s in stats), len(stats)


def b(n: float) -> str:
    """Bytes, human-readable (decimal units) with the exact count for small ones."""
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def sized(path: Path) -> str:
    st, alloc, n = size(path)
    return f"{b(st)} ({st:,} B; {n} files, {b(alloc)} allocated)"


# ---------------------------------------------------------------------------- sections

def x(ratio: float) -> str:
    """A ratio: two significant figures below 10, whole above."""
    return f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.2g}"


def bench_cost(a: argparse.Namespace, run_a: dict, run_b: dict, recorded: set[int],
               setup: float, save_initial: float) -> None:
    ia, ib = intervals(run_a["stamps"]), intervals(run_b["stamps"], recorded)
    ref = float(np.median(list(ia["step"].values())))
    rec = ib["record"]
    first = rec[0] - save_initial
    later = sorted(s for s in rec if s > 0)
    rest = [rec[s] for s in later]
    after = {s + 1 for s in rec if s + 1 in ib["step"]}
    steps_b = [ib["step"][s] for s in sorted(ib["step"]) if s not in after]
    steps_after = [ib["step"][s] for s in sorted(after)]
    print(f"\n## 1. Callback cost, every={a.every} over {a.steps} steps "
          f"({len(rec)} records: steps {', '.join(map(str, sorted(rec)))})")
    print(f"- one training step (median of run A's {len(ia['step'])}, no callback): "
          f"**{ref * 1e3:.2f} ms** (min {min(ia['step'].values()) * 1e3:.2f}, max "
          f"{max(ia['step'].values()) * 1e3:.2f} ms)")
    print(f"- TrainerCallback(...) construction (config checked, eval batch read): "
          f"{setup * 1e3:.1f} ms = {x(setup / ref)} training steps")
    print(f"- step 0, the first record in the process: **{first:.3f}"
          f" s = {x(first / ref)} training steps**; the step-0 checkpoint (save_initial) "
          f"besides: {save_initial * 1e3:.1f} ms = {x(save_initial / ref)} training steps")
    print(f"- each later record ({len(rest)}: steps {', '.join(map(str, later))}): median "
          f"**{np.median(rest):.3f} s = {x(np.median(rest) / ref)} training steps** "
          f"(min {x(min(rest) / ref)}, max {x(max(rest) / ref)})")
    print("  - per record, s (training steps): " + ", ".join(
        f"{s}: {rec[s]:.3f} ({x(rec[s] / ref)})" for s in later))
    print(f"- run B's own training steps (with the callback): the {len(steps_b)} not right "
          f"after a record: median {np.median(steps_b) * 1e3:.2f} ms = "
          f"{x(np.median(steps_b) / ref)} x run A's; the {len(steps_after)} right after a "
          f"record: median {np.median(steps_after) * 1e3:.2f} ms = "
          f"{x(np.median(steps_after) / ref)} x")
    if ia["save"]:
        saves = list(ia["save"].values())
        print(f"- one Trainer checkpoint save in run A (median of {len(saves)}): "
              f"{np.median(saves) * 1e3:.1f} ms = {x(np.median(saves) / ref)} training steps;"
              f" a later record over a checkpoint save: {x(np.median(rest) / np.median(saves))}")
    total_steps = sum(ib["step"].values())
    total_rec = sum(rec.values()) - save_initial
    print(f"- run B, its training steps and records over its training steps alone: "
          f"**{x((total_steps + total_rec) / total_steps)} x** (step 0's record left out: "
          f"{x((total_steps + total_rec - first) / total_steps)} x)")
    print(f"- Trainer.train() wall time: run A {run_a['wall']:.1f} s (checkpoints every "
          f"{a.every}), run B {run_b['wall']:.1f} s (recording, final checkpoint only)")


def bench_disk(a: argparse.Namespace, root: Path, run_b: dict, recorded: list[Path]) -> dict:
    folders_a = sorted((root / "A").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
    one = root / "A" / f"checkpoint-{a.every}"
    weights = one / "model.safetensors"
    stores = {int(p.name[4:-5]): p for p in recorded}
    print(f"\n## 2. Disk (files written by the runs; sum of file sizes, allocated in "
          f"brackets); {run_b['params']:,} parameters")
    print(f"- one Trainer checkpoint folder (run A, {one.name}): **{sized(one)}**")
    for f in files_of(one):
        print(f"  - {f.name}: {f.stat().st_size:,} B")
    print(f"- its weights file alone (model.safetensors): **{b(weights.stat().st_size)}**")
    st = {s: size(p) for s, p in stores.items()}
    print(f"- one recorded store (run B, {stores[a.every].name}): **{sized(stores[a.every])}**"
          f"; over the {len(stores)} stores: {b(min(v[0] for v in st.values()))} to "
          f"{b(max(v[0] for v in st.values()))}")
    ck, sv = size(one)[0], st[a.every][0]
    print(f"- one store over one checkpoint folder: {sv / ck:.2f}; over its weights file: "
          f"{sv / weights.stat().st_size:.2f}")
    total_a = [size(f) for f in folders_a]
    a_bytes = sum(x[0] for x in total_a)
    a_weights = sum(size(f / "model.safetensors")[0] for f in folders_a)
    initial, final = root / "B" / "checkpoint-0", root / "B" / f"checkpoint-{a.steps}"
    b_parts = {"step-0 folder (the callback's)": size(initial),
               f"final checkpoint ({final.name})": size(final),
               f"{len(stores)} recorded stores": tuple(map(sum, zip(*st.values(),
                                                                    strict=True)))}
    b_bytes = sum(x[0] for x in b_parts.values())
    print(f"- **run A, checkpoints every {a.every} steps** ({len(folders_a)} folders: "
          f"{', '.join(f.name[11:] for f in folders_a)}; no step 0): **{b(a_bytes)}** "
          f"({a_bytes:,} B, {b(sum(x[1] for x in total_a))} allocated); their weights files "
          f"alone {b(a_weights)}")
    print(f"- **run B, step 0 + final + recorded stores**: **{b(b_bytes)}** ({b_bytes:,} B, "
          f"{b(sum(x[1] for x in b_parts.values()))} allocated)")
    for name, (nbytes, alloc, n) in b_parts.items():
        print(f"  - {name}: {b(nbytes)} ({n} files, {b(alloc)} allocated)")
    print(f"- run A over run B: **{a_bytes / b_bytes:.2f}** (weights files alone over run B: "
          f"{a_weights / b_bytes:.2f})")
    return {"ckpt_per_param": ck / run_b["params"], "store": sv, "saves": len(folders_a),
            "stores": len(stores)}


def pythia_params(hidden: int, layers: int, heads: int) -> int:
    cfg = GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, vocab_size=50304, rotary_pct=0.25,
                        max_position_embeddings=2048, tie_word_embeddings=False)
    with torch.device("meta"):
        return sum(p.numel() for p in GPTNeoXForCausalLM(cfg).parameters())


def bench_arithmetic(a: argparse.Namespace, disk: dict) -> None:
    hidden, layers = SHAPES[a.shape][:2]
    est = store_bytes(EVAL["tokens"], hidden, layers)
    print(f"\n## 2b. Arithmetic extrapolation (not measured): {disk['saves']} checkpoints vs "
          f"2 + {disk['stores']} stores, as in this run")
    print(f"- checkpoint: 12 bytes per parameter (float32 weights and AdamW's two moments) "
          f"times the parameters; this run's folder holds {disk['ckpt_per_param']:.1f} per "
          f"parameter, its small files (RNG states, arguments, config) weighing at this size")
    print(f"- store: lmdynamics.plan.store_bytes at tokens={a.plan_tokens} (uncompressed "
          f"activations and spectra, no Conjecture statistics); for this run's shape at "
          f"tokens={EVAL['tokens']} it says {b(est)} against {b(disk['store'])} measured")
    print("\n| shape | parameters | checkpoint | store | every-K checkpoints | "
          "step 0 + final + stores | ratio |\n|---|---|---|---|---|---|---|")
    for name, (hid, lay, heads) in PYTHIA.items():
        params = pythia_params(hid, lay, heads)
        ckpt = 12 * params
        store = store_bytes(a.plan_tokens, hid, lay)
        every, kept = disk["saves"] * ckpt, 2 * ckpt + disk["stores"] * store
        print(f"| pythia-{name} | {params / 1e6:.1f}M | {b(ckpt)} (12 B/param) | {b(store)} "
              f"| {b(every)} | {b(kept)} | {every / kept:.1f} |")


def bit_identity(root: Path, a: argparse.Namespace, run_a: dict, run_b: dict) -> bool:
    sa, sb = run_a["state"], run_b["state"]
    same = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    name = f"checkpoint-{a.steps}/model.safetensors"
    files = (root / "A" / name).read_bytes() == (root / "B" / name).read_bytes()
    print(f"\n## 3. Bit-identity\n- final weights with and without the callback equal "
          f"(torch.equal, {len(sa)} tensors): **{'yes' if same else 'no'}**")
    print(f"- final checkpoints' model.safetensors equal byte for byte: "
          f"**{'yes' if files else 'no'}**")
    return same and files


# --------------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), default="tiny")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps S")
    p.add_argument("--every", type=int, default=10, help="record / checkpoint every K steps")
    p.add_argument("--batch", type=int, default=4, help=f"sequences of {TRAIN_SEQ} tokens "
                   "per training step")
    p.add_argument("--no-conjecture", action="store_true",
                   help="record with conjecture.enabled false")
    p.add_argument("--plan-tokens", type=int, default=4096,
                   help="tokens of the arithmetic extrapolation's stores")
    p.add_argument("--quick", action="store_true", help="S=12, every 4")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads of this process (pinned before numpy and torch load)")
    p.add_argument("--root", type=Path, default=None,
                   help="a new folder for the runs, kept (default: a temporary one, removed)")
    a = p.parse_args()
    if a.quick:
        a.steps, a.every = 12, 4
    if a.steps % a.every:
        p.error(f"--steps {a.steps} is not a multiple of --every {a.every}")
    if a.root is not None and a.root.resolve().is_relative_to(ROOT):
        p.error(f"--root {a.root}: inside the repository; name a folder outside it")
    hidden, layers, heads, mlp, vocab = SHAPES[a.shape]
    print(f"# lmdynamics.record benchmark: your own training run\n{machine()}")
    print(f"\nGPT-NeoX `{a.shape}`: hidden {hidden}, {layers} layers, {heads} heads, MLP {mlp}, "
          f"vocabulary {vocab}, dropout 0.1; Trainer: {a.steps} steps of {a.batch} x "
          f"{TRAIN_SEQ} tokens, AdamW lr 3e-3, CPU. Recording: every={a.every}, "
          f"tokens {EVAL['tokens']}, {EVAL['sequences']} eval sequences x {EVAL['seq_len']}, "
          f"Conjecture statistics {'off' if a.no_conjecture else 'on'}.")
    if a.root is None:
        tmp = tempfile.TemporaryDirectory(prefix="lmdynamics-own-")
        root = Path(tmp.name)
    else:
        tmp, root = None, a.root
        root.mkdir(parents=True, exist_ok=False)
    try:
        np.save(root / "eval.npy", np.random.default_rng(0).integers(
            0, vocab, size=(2 * EVAL["sequences"], EVAL["seq_len"])))
        config = {"source": "local", "suite": "own", "sizes": ["s"], "steps": "discover",
                  "tokens": EVAL["tokens"],
                  "local": {"path": str(root / "B" / "checkpoint-{step}"),
                            "recorded": str(root / "stores" / "step{step}.zarr"),
                            "settle_seconds": 0},
                  "eval_data": {"path": str(root / "eval.npy"), "seq_len": EVAL["seq_len"]},
                  "hub": {"sequences": EVAL["sequences"]},
                  "conjecture": {"enabled": not a.no_conjecture}}
        run_a = train(a, root / "A", save_steps=a.every)
        t0 = time.perf_counter()
        callback = TrainerCallback(config, size="s", every=a.every)
        setup = time.perf_counter() - t0
        saved: list[float] = []
        save_initial = callback.recorder.save_initial

        def timed_save_initial(model):
            t = time.perf_counter()
            try:
                return save_initial(model)
            finally:
                saved.append(time.perf_counter() - t)

        callback.recorder.save_initial = timed_save_initial
        run_b = train(a, root / "B", save_steps=a.steps, callbacks=[callback])
        recorded = {int(p.name[4:-5]) for p in callback.recorded}  # step{step}.zarr
        bench_cost(a, run_a, run_b, recorded, setup, sum(saved))
        disk = bench_disk(a, root, run_b, callback.recorded)
        bench_arithmetic(a, disk)
        ok = bit_identity(root, a, run_a, run_b)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"\nload average {load():.2f} at end")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
