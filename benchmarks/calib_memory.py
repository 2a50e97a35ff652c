"""Peak memory of `compress run` against the size of the calibration text: bounded by what is sampled, not the file.

    python benchmarks/calib_memory.py [--sizes-mb 1 10 100] [--one-line-mb 40] [--former 1 4] [--windows 64]

Writes .txt files of the given sizes (paragraphs of the pydoc corpus, shuffled with a fixed seed, repeated to
size; `--one-line-mb`: the same with every newline a space) and a tiny random Llama (tests/tiny.py) into a temporary
folder, and runs `compress run` on each text in its own process (FLAP 30%, `--windows` x 256 calibration tokens,
evaluation 4 x 256 on the text's held-out split). The peak is the process's peak resident memory as report.json
records it (ru_maxrss); `split tokens` is how many calibration-split tokens the windows were drawn across (all of
them: one streaming pass with a seeded reservoir past the pool, as the run's log says). Acceptance: every run's
peak within 1.2x of the smallest text's. `--former` adds the former
way (the whole calibration split joined and tokenized in one call) for the sizes it names, measured alone in a
process (tokenizing only, no model); it grows by about 150 bytes per character, so keep those sizes small. Writes
docs/results/calib_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._harness import write_results  # noqa: E402

ACCEPT = 1.2  # any run's peak over the smallest text's


def write_text(path: Path, size_mb: float, seed: int = 0, one_line: bool = False) -> int:
    """Paragraphs of pydoc, shuffled (seeded) and repeated until `size_mb` MiB are written (`one_line`: every
    newline written as a space, so the file is one line); returns the bytes."""
    from pydoc_data.topics import topics

    paragraphs = [p for k in sorted(topics) for p in re.split(r"\n\s*\n", topics[k]) if p.strip()]
    rng, want, written = random.Random(seed), int(size_mb * 2**20), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < want:
            rng.shuffle(paragraphs)
            for p in paragraphs:
                f.write((p + "\n\n").replace("\n", " ") if one_line else p + "\n\n")
                written += len(p.encode()) + 2
                if written >= want:
                    break
    return written


def run_compress(model: Path, text: Path, work: Path, windows: int, threads: int) -> dict:
    """`compress run` on `text` in a fresh process; its report's peak memory and seconds."""
    import yaml

    recipe = {"name": text.stem, "model": str(model), "seed": 0,
              "calibration": {"source": str(text), "windows": windows, "seq_len": 256},
              "passes": [{"pass": "flap", "target": 0.3}],
              "evaluate": {"seq_len": 256, "max_windows": 4, "extra": []}}
    path = work / f"{text.stem}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = work / f"art-{text.stem}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1", "COMPRESS_RUNS": str(work / "runs")}
    cli = [sys.executable, "-c", "from compress.cli import main; main()"]
    proc = subprocess.run([*cli, "run", "-r", str(path), "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"compress run on {text} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    drawn = re.search(r"calibration: \d+ windows of \d+ tokens drawn across all ([\d,]+) tokens", proc.stdout)
    return {"peak MB": report["peak_memory_mb"], "run s": report["seconds"],
            "held-out ppl": report["quality"][0]["dense ppl"],
            "split tokens": int(drawn.group(1).replace(",", "")) if drawn else None}


FORMER = """
import re, resource, sys, time
from tests.tiny import make_tokenizer
from calibration.sources import Corpus, tokenize
tok = make_tokenizer()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
text = open(sys.argv[1], encoding="utf-8").read()
docs = tuple(p for p in re.split(r"\\n\\s*\\n", text) if p.strip())
ids = tokenize(tok, Corpus("t", lambda: iter(docs)).split("calibration"))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(peak, peak - base, time.perf_counter() - t0)
"""


def run_former(text: Path, threads: int) -> dict:
    """The former way, tokenizing only: read the whole file, join its calibration split, tokenize in one call."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", FORMER, str(text)], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"former tokenization of {text} failed:\n{proc.stderr[-3000:]}")
    peak, above, seconds = map(float, proc.stdout.split())
    return {"peak MB": round(peak, 1), "tokenizing MB": round(above, 1), "s": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 10, 100])
    ap.add_argument("--one-line-mb", type=float, nargs="*", default=[40], help="sizes (MB) of one-line texts")
    ap.add_argument("--former", type=float, nargs="*", default=[1, 4], help="sizes (MB) to tokenize the former way")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "calib_memory"))
    args = ap.parse_args()
    from tests.tiny import make_tiny_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="calib-memory-") as tmp:
        work = Path(tmp)
        model = make_tiny_model(work / "tiny-llama")
        for size in sorted(set(args.sizes_mb) | set(args.former)):
            text = work / f"text-{size:g}mb.txt"
            nbytes = write_text(text, size)
            if size in args.sizes_mb:
                rows.append({"text MB": size, "bytes": nbytes, "way": "compress run (streamed, whole split sampled)",
                             **run_compress(model, text, work, args.windows, args.threads)})
                print(json.dumps(rows[-1]), flush=True)
            if size in args.former:
                rows.append({"text MB": size, "bytes": nbytes, "way": "former: whole split in one call (tokenizing only)",
                             **run_former(text, args.threads)})
                print(json.dumps(rows[-1]), flush=True)
            text.unlink()
        for size in args.one_line_mb:
            text = work / f"line-{size:g}mb.txt"
            nbytes = write_text(text, size, one_line=True)
            rows.append({"text MB": size, "bytes": nbytes,
                         "way": "compress run (streamed, whole split sampled), one line",
                         **run_compress(model, text, work, args.windows, args.threads)})
            print(json.dumps(rows[-1]), flush=True)
            text.unlink()
    runs = [r for r in rows if r["way"].startswith("compress run")]
    ratio = round(max(r["peak MB"] for r in runs) / runs[0]["peak MB"], 3)  # runs[0]: the smallest text
    meta = {
        "model": "tiny random Llama (tests/tiny.py: hidden 96, 3 blocks, byte-level BPE of 384 tokens trained on pydoc)",
        "recipe": f"FLAP 30%; calibration {args.windows} x 256 tokens, seed 0; evaluation 4 x 256 held-out tokens",
        "text": "pydoc paragraphs shuffled (seed 0) and repeated to size, one .txt",
        "peak MB": "peak resident memory of the whole `compress run` process (report.json peak_memory_mb, ru_maxrss)",
        "split tokens": "tokens of the calibration split the windows were drawn across (the run's log line)",
        "former": "the code before this change, tokenizing only: the whole file read, its calibration split joined "
                  "and tokenized in one call; peak of that process and the part above its start (tokenizing MB)",
        "threads": args.threads,
        "largest peak / smallest text's peak": f"{ratio} (acceptance: at most {ACCEPT})",
    }
    write_results(Path(args.out), "Calibration memory against the size of the text", __file__, meta, rows)
    if ratio > ACCEPT:
        raise SystemExit(f"peak memory grows with the text: {ratio} > {ACCEPT}")


if __name__ == "__main__":
    main()
