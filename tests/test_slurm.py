"""Against a real single-node SLURM (slurm/local/start.sh; `.ci/run` starts it): the used-by command submits without
-m, a 2-job sweep runs and becomes a table and a plot, and a stage signalled in training, in its held-out test and in
its bench is requeued each time, resumes, and ends exactly like an uninterrupted run.

Skipped when no cluster answers, unless UAE_REQUIRE_SLURM=1 (set by .ci/run), which turns the skip into a failure.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]


# Tiny stages: every stage runs its real code for a few steps. One thread per process, so a job under SLURM and a
# local run compute exactly the same numbers.
TINY = ["data.train_size=64", "data.val_size=8", "stages.u4g.data.val_size=8", "data.batch_size=8", "data.eval_batch_size=8",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
        "callbacks.preview.every_n_steps=1000", "bench.batch_size=8", "bench.geneval.max_prompts=6",
        "bench.geneval.samples=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # sbatch passes the environment on to the job


def run_dir(root: Path) -> Path:
    """The single run directory under a runs root (its name comes from the overrides)."""
    found = [p.parent for p in root.rglob(".hydra")]
    assert len(found) == 1, found
    return found[0]


def uae(args, timeout=900, **kw):
    return subprocess.run([sys.executable, "-m", "uae_lightning", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, **kw)


def test_used_by_command_submits_without_multirun_flag(tmp_path):
    steps = [f"stages.{s}.trainer.max_steps=2" for s in ("pretrain", "captioner", "cold_start", "g4u", "u4g")]
    out = uae(["+experiment=toy_u4g", "hydra/launcher=submitit_slurm", f"paths.runs_dir={tmp_path}", *TINY, *steps,
               "stages.g4u.module.group_size=2", "stages.u4g.module.group_size=2", "stages.g4u.data.batch_size=2",
               "stages.u4g.data.batch_size=2", "stages.u4g.module.num_steps=2"])
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = [p for p in (tmp_path / "toy_u4g" / ".submitit").iterdir() if p.is_dir()]
    assert len(jobs) == 1  # one SLURM job (an array of one) ran the whole toy pipeline
    summary = json.loads((run_dir(tmp_path) / "summary.json").read_text())
    assert set(summary["unified_bench"]) == {"pretrain", "captioner", "cold_start", "g4u", "u4g"}
    assert "reward_after" in summary["stages"]["u4g"]
    log = "".join(p.read_text() for p in jobs[0].glob("*_log.*"))
    assert "=== stage 5/5: u4g ===" in log  # the job's own log: it ran the pipeline


def test_two_job_sweep_and_the_sweep_table(tmp_path):
    out = uae(["-m", "+experiment=toy_pretrain", "hydra/launcher=submitit_slurm", f"paths.runs_dir={tmp_path}", *TINY,
               "stages.pretrain.trainer.max_steps=3", "stages.pretrain.module.lr=1e-3,3e-3"])
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = tmp_path / "toy_pretrain"
    runs = sorted(p.parent.parent for p in sweep.rglob(".hydra/overrides.yaml"))
    assert len(runs) == 2 and all((r / "summary.json").is_file() for r in runs)
    from uae_lightning.sweeps import main as sweeps_main

    rows = sweeps_main([str(sweep), "--metric", "pretrain/similarity_complete_caption"])
    assert len(rows) == 2
    table = (sweep / "sweep.md").read_text()
    assert "stages.pretrain.module.lr=0.001" in table and "stages.pretrain.module.lr=0.003" in table
    assert "pretrain/similarity_complete_caption" in table.splitlines()[0]
    csv_rows = (sweep / "sweep.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 3
    from PIL import Image

    assert Image.open(sweep / "sweep.png").size[0] > 100


def _squeue() -> list[tuple[str, str]]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True)
    return [tuple(line.split()) for line in out.stdout.strip().splitlines() if line.strip()]


def _wait(predicate, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _ckpt_step(path: Path) -> int:
    if not path.is_file():
        return -1
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["global_step"]
    except Exception:  # being written
        return -1


def _log(root: Path) -> str:
    return "".join(p.read_text() for p in root.rglob(".submitit/*/*_log.out"))


def test_signalled_in_training_test_and_bench_requeues_and_matches_an_uninterrupted_run(tmp_path):
    """pretrain, 60 steps over 2 epochs of 32 batches, then its held-out test (8 batches) and Unified-Bench (8
    batches), both slowed to ~1 s a batch (100 sampling steps) so that a signal sent when the phase starts lands
    inside it. SIGUSR1 at step >= 30 (mid-epoch), then during the held-out test, then during the bench: each time the
    job requeues (the log names where it stopped), and the final run equals an uninterrupted one: same step, same
    held-out metrics, same Unified-Bench score (all bit-identical on CPU with fixed seeds)."""
    args = ["+experiment=toy_pretrain", *TINY, "data.train_size=64", "data.val_size=32", "data.batch_size=2",
            "data.eval_batch_size=4", "bench.batch_size=4", "bench.num_steps=100", "stages.pretrain.module.eval_steps=100",
            "stages.pretrain.trainer.max_steps=60", "trainer.checkpoint_every_n_steps=10"]
    ref = uae([*args, f"paths.runs_dir={tmp_path / 'ref'}"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    root = tmp_path / "slurm"
    proc = subprocess.Popen([sys.executable, "-m", "uae_lightning", *args, "hydra/launcher=submitit_slurm",
                             f"paths.runs_dir={root}"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ckpt = None
        for phase in ("training", "held-out test", "Unified-Bench"):
            job, _ = _wait(lambda: [j for j in _squeue() if j[1] == "RUNNING"], 180, "the job to run")[0]
            if phase == "training":
                ckpt = _wait(lambda: list(root.rglob("pretrain/checkpoints")), 120, "the run")[0] / "last.ckpt"
                _wait(lambda: _ckpt_step(ckpt) >= 30, 300, "step 30")
            elif phase == "held-out test":
                _wait(lambda: "trained to step 60; held-out test" in _log(root), 300, "the held-out test")
            else:
                _wait(lambda: "Unified-Bench at" in _log(root), 300, "the bench")
            subprocess.run(["scancel", "--signal=USR1", job], check=True)
            # requeued: held back by SLURM's BeginTime; release it now
            _wait(lambda: any(j == job and s == "PENDING" for j, s in _squeue()), 120, "the requeue")
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    log = _log(root)
    requeues = [line for line in log.splitlines() if "requeued SLURM job" in line]
    assert len(requeues) == 3, requeues
    assert "(training, step" in requeues[0] and "(the held-out test, batch" in requeues[1]
    assert "(Unified-Bench of" in requeues[2]
    assert log.count("resuming from") == 2  # the training and the test re-ran the stage; the bench found it done
    assert "images already done" in log  # the bench resumed after its finished images
    run, ref_run = run_dir(root), run_dir(tmp_path / "ref")
    done = json.loads((run / "pretrain" / "done.json").read_text())
    ref_done = json.loads((ref_run / "pretrain" / "done.json").read_text())
    assert done["global_step"] == ref_done["global_step"] == 60
    assert done["metrics"] == ref_done["metrics"]
    assert json.loads((run / "summary.json").read_text()) == json.loads((ref_run / "summary.json").read_text())


def test_a_chain_submitted_once_returns_at_once_survives_a_killed_stage_and_matches_the_foreground(tmp_path):
    """`python -m uae_lightning.chain` queues a 2-round toy chain (G4U, U4G, then both again) as 4 dependent jobs and
    returns; one stage's job is cancelled while it trains, the jobs after it are cancelled by SLURM, and submitting
    the same command again queues the unfinished stages; the chain's summary equals the same run's in the
    foreground."""
    from conftest import FAST
    from test_rounds import ROUNDS

    args = [*TINY, *[a for a in ROUNDS if a not in FAST], "stages.g4u.trainer.max_steps=4",
            "stages.g4u.trainer.checkpoint_every_n_steps=1"]
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "uae_lightning.chain", f"paths.runs_dir={tmp_path / 'chain'}", *args],
                         capture_output=True, text=True, timeout=120, env=ENV)
    took = time.time() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    assert took < 60, took
    jobs = dict(line.split()[:3:2] for line in out.stdout.splitlines() if " job " in line)
    assert list(jobs) == ["g4u", "u4g", "g4u_round2", "u4g_round2"] and "squeue -j" in out.stdout
    [results] = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("results: ")]
    run = Path(results).parent
    assert run.parent.parent == tmp_path / "chain"
    # Cancel round 1's G4U once it has written a mid-stage checkpoint: the 3 jobs after it never start.
    _wait(lambda: (run / "g4u" / "checkpoints" / "last.ckpt").exists(), 300, "round 1's G4U to checkpoint")
    subprocess.run(["scancel", jobs["g4u"]], check=True)
    _wait(lambda: not _squeue(), 120, "the chain's jobs to leave the queue")
    assert not (run / "g4u" / "done.json").exists() and not (run / "u4g").exists()
    again = subprocess.run([sys.executable, "-m", "uae_lightning.chain", f"paths.runs_dir={tmp_path / 'chain'}", *args],
                           capture_output=True, text=True, timeout=120, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [line.split()[0] for line in again.stdout.splitlines() if " job " in line] == list(jobs)
    _wait(lambda: not _squeue(), 600, "the re-submitted chain to finish")
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["stages"]) == list(jobs)
    log = (run / "slurm").glob("g4u-*.out")
    assert any("resuming from" in p.read_text() for p in log)  # the second G4U job resumed the cancelled one
    fg = uae([f"paths.runs_dir={tmp_path / 'fg'}", *args])
    assert fg.returncode == 0, fg.stderr[-3000:]
    assert json.loads((run_dir(tmp_path / "fg") / "summary.json").read_text()) == summary


def _quiet_qwen(src: Path, dst: Path) -> Path:
    """The fixture's tiny random Qwen2.5-VL with the embeddings (tied to the output layer) of the whitespace bytes
    zeroed: its greedy captions are then runs of visible tokens instead of newlines, which collapse to nothing."""
    import shutil

    from safetensors.torch import load_file, save_file
    from uae_lightning.rehearsal import qwen_tokenizer

    shutil.copytree(src, dst)
    sd = load_file(src / "model.safetensors")
    tok = qwen_tokenizer()
    sd["model.embed_tokens.weight"][[i for i in range(256) if not tok.decode([i]).strip()]] = 0
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _shard_captions(folder: Path) -> dict[str, tuple[str, dict, bytes]]:
    import webdataset as wds

    out = {}
    for tar in sorted(folder.glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            assert "png" in s  # the source's image bytes, under the extension of what they are
            out[s["__key__"]] = (s["txt"].decode(), json.loads(s["json"]), s["png"])
    return out


def test_recaption_runs_as_two_slurm_tasks_survives_a_kill_and_its_output_trains_the_pretrain_preset(tmp_path):
    """An img2dataset-style WebDataset (the fixture's 24 images twice, one corrupt member, one sample without a
    caption) recaptioned with the paper preset's captioner on the fixture by 2 SLURM tasks (slurm/templates/
    recaption.sbatch); the job is cancelled once some shards are written, then submitted again. The result equals a
    one-process run caption for caption; its shards are the training data of `+experiment=pretrain data=webdataset`."""
    from test_data_sources import write_webdataset
    from test_rehearsal import stage_overrides
    from uae_lightning.rehearsal import write_fixture

    paths = write_fixture(tmp_path / "fixture")
    qwen = _quiet_qwen(paths["Qwen/Qwen2.5-VL-3B-Instruct"], tmp_path / "qwen")
    rows = [json.loads(line) for line in paths["manifest"].read_text().splitlines()]
    samples = [{"key": f"{i:09d}", "image": (paths["manifest"].parent / r["path"]).read_bytes(), "ext": "png",
                "caption": r["caption"], "meta": {"url": f"https://example.com/{i}.png"}}
               for i, r in enumerate(rows + rows)]
    samples[5]["image"] = b"not a png"
    samples[8]["caption"] = None
    write_webdataset(tmp_path / "corpus", samples, per_shard=16)
    overrides = ["+experiment=pretrain", "data=webdataset", f"data.shards={tmp_path / 'corpus'}", "data.resolution=64",
                 f"model.encoder.pretrained={qwen}"]
    flags = ["--shard-size", "4", "--batch-size", "2", "--max-new-tokens", "48"]
    script = Path(__file__).resolve().parent.parent / "slurm" / "templates" / "recaption.sbatch"
    out = tmp_path / "captions"

    # The template runs `python`: the environment's, as after `source .venv/bin/activate`.
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}:{ENV['PATH']}"}

    def submit():
        res = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1",
                              f"--output={tmp_path}/recaption-%j.out", str(script), str(out), *overrides, *flags],
                             capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
        return res.stdout.strip().split(";")[0]

    job = submit()
    _wait(lambda: len(list(out.glob("*.tar"))) >= 2 or not _squeue(), 300, "the first shards")
    assert _squeue(), (tmp_path / f"recaption-{job}.out").read_text()[-3000:]  # still running
    subprocess.run(["scancel", job], check=True)
    _wait(lambda: not _squeue(), 120, "the cancelled job to leave the queue")
    written = len(list(out.glob("*.tar")))
    assert 2 <= written < 12, written  # killed part-way: 48 samples are 12 shards
    job = submit()
    _wait(lambda: not _squeue(), 600, "the resubmitted job to finish")
    log = (tmp_path / f"recaption-{job}.out").read_text()
    assert "task 0/2" in log and "task 1/2" in log and "captions/s" in log and "tokens/s" in log
    todo = sum(int(line.split(", ")[-1].split()[0]) for line in log.splitlines() if "to caption" in line)
    assert todo == 12 - written  # the finished shards were not captioned again
    assert sorted(p.name for p in out.glob("*.tar")) == [f"{k:05d}.tar" for k in range(12)]
    assert not list((out / "_progress").iterdir())
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    assert sum(s["written"] for s in stats) == 47 and {k: v for s in stats for k, v in s["skipped"].items()} == \
        {"corrupt": 1}
    got = _shard_captions(out)
    assert set(got) == {s["key"] for s in samples} - {samples[5]["key"]}
    # Each key holds its own sample: the source's image bytes, caption and JSON. (The random captioner writes the same
    # caption for every image, so the images, not the captions, show that nothing was shuffled across a resume.)
    for s in samples:
        if s["key"] in got:
            text, meta, image = got[s["key"]]
            assert text.strip() and meta["short_caption"] == (s["caption"] or "") and meta["url"] == s["meta"]["url"]
            assert image == s["image"]
    # The folder remembers how it was made: a resume with other settings is refused before any model loads.
    other = subprocess.run([sys.executable, "-m", "uae_lightning.recaption", str(out), *overrides, *flags[:-2],
                            "--max-new-tokens", "16"], capture_output=True, text=True, env=ENV, timeout=300)
    assert other.returncode != 0 and "other settings (max_new_tokens)" in other.stderr
    # One process, uninterrupted: the same captions.
    ref = subprocess.run([sys.executable, "-m", "uae_lightning.recaption", str(tmp_path / "ref"), *overrides, *flags],
                         capture_output=True, text=True, env={k: v for k, v in ENV.items() if not k.startswith("SLURM")},
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert {k: v[0] for k, v in _shard_captions(tmp_path / "ref").items()} == {k: v[0] for k, v in got.items()}
    # The output is stage-1 training data, read by the paper preset as it stands.
    train = uae(["+experiment=pretrain", "data=webdataset", f"data.shards={out}",
                 "data.short_caption_field=json.short_caption", f"paths.runs_dir={tmp_path / 'runs'}",
                 "trainer.accelerator=cpu", "trainer.devices=1", "strategy=auto",
                 *[o for o in stage_overrides(paths)["pretrain"] if not o.startswith("data.batch_size")],
                 "data.batch_size=2"])
    assert train.returncode == 0, train.stderr[-3000:]
    done = json.loads((run_dir(tmp_path / "runs") / "pretrain" / "done.json").read_text())
    assert done["global_step"] == 2
