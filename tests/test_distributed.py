"""Training across processes on the CPU (gloo), launched as users do: `truthgpt train --nproc 2`.

The reference is always one process with the same global batch (twice the grad_accum_steps):
two processes under DDP or FSDP (each accumulating two micro-batches, so the gradient sync
skipped on the first is exercised), a run one of whose ranks was killed and resumed, and an
FSDP checkpoint resumed by a single process all give its per-step losses. A diffusion model's
ranks draw their own noise: its FSDP run is held to its DDP run, and that to one process's
evaluation of the weights it saved.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import digits_raw_config, tiny_raw_config
from typer.testing import CliRunner

from truthgpt.cli import app
from truthgpt.config import load
from truthgpt.errors import CheckpointError, ConfigError
from truthgpt.models import load_model
from truthgpt.training.checkpoint import find_resumable
from truthgpt.training.distributed import check_gpu_count, resolve_parallel
from truthgpt.training.ema import EMA
from truthgpt.training.evaluate import evaluate_run
from truthgpt.training.optim import build_optimizer
from truthgpt.training.run import train
from truthgpt.training.sharded import export_checkpoint, load_sharded
from truthgpt.training.tasks import build_task

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to find ranks")

STEPS = 8


def dist_config(tmp_path: Path, name: str, **training: object) -> dict:
    return tiny_raw_config(
        tmp_path,
        run_name=name,
        data={"max_documents": 12},
        # constant after warm-up: a resume that raises max_steps keeps the schedule
        optim={"lr": 3e-3, "warmup_steps": 2, "schedule": "constant"},
        training={
            "max_steps": STEPS,
            "batch_size": 4,
            "grad_accum_steps": 2,
            "eval_every": 4,
            "eval_batches": 3,
            "log_every": 1,
            **training,
        },
        checkpoint={"save_every": 4, "keep_last": 2},
        logging={"progress": "none", "tensorboard": False, "plot": False},
    )


def losses(run_dir: Path, kind: str = "train") -> dict[int, float]:
    key = "loss" if kind == "train" else "val_loss"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if r["kind"] == kind}


def assert_close(got: dict[int, float], expected: dict[int, float], rel: float = 1e-5) -> None:
    assert sorted(got) == sorted(expected)
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, rel=rel, abs=1e-6), step


def launch(tmp_path: Path, raw: dict, *args: str, session: bool = False) -> subprocess.Popen:
    """`truthgpt train CONFIG --nproc 2 ...` in the background (torchrun, gloo); `session`:
    in a process group of its own, as a terminal's foreground job is (for Ctrl-C)."""
    path = tmp_path / f"{raw['run_name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # two ranks on two cores
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "truthgpt", "train", str(path), "--nproc", "2", *args]
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=session,
    )


def run_two(tmp_path: Path, raw: dict, *args: str) -> str:
    proc = launch(tmp_path, raw, *args)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output.decode()[-4000:]
    return output.decode()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, the global batch of two ranks by accumulation: the run to match."""
    tmp_path = tmp_path_factory.mktemp("reference")
    return train(load(dist_config(tmp_path, "reference", grad_accum_steps=4))).run_dir


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two FSDP processes for the first half of the reference's steps."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    raw = dist_config(tmp_path, "fsdp", parallel="fsdp", max_steps=STEPS // 2, micro_batch="auto")
    output = run_two(tmp_path, raw)
    (tmp_path / "output.txt").write_text(output)
    return raw


def test_two_ddp_processes_give_the_one_process_losses(tmp_path: Path, reference: Path) -> None:
    raw = dist_config(tmp_path, "ddp")  # parallel auto: ddp under torchrun
    run_two(tmp_path, raw)
    run_dir = Path(raw["output_dir"]) / "ddp"
    assert_close(losses(run_dir), losses(reference))
    assert_close(losses(run_dir, "eval"), losses(reference, "eval"))
    # Rank 0 alone wrote the single-process checkpoint format.
    assert (run_dir / "checkpoints" / "last" / "model.safetensors").is_file()
    history = (run_dir / "config_history.jsonl").read_text().splitlines()
    assert len(history) == 1  # one start, written once


def test_two_fsdp_processes_give_the_one_process_losses(fsdp_run: dict, reference: Path) -> None:
    run_dir = Path(fsdp_run["output_dir"]) / "fsdp"
    expected = {s: v for s, v in losses(reference).items() if s <= STEPS // 2}
    # Rank 1 built its model on the meta device: its shards are rank 0's weights, or these
    # losses (and the one-process reference's) would part from the first step.
    output = (run_dir.parents[1] / "output.txt").read_text()
    assert "fsdp: one full copy of the weights (rank 0's) sharded to 2 ranks" in output
    assert "micro_batch auto: not probed across FSDP processes; keeping the given 4 x 2" in output
    assert_close(losses(run_dir), expected)
    last = run_dir / "checkpoints" / "last"
    assert sorted(p.name for p in (last / "sharded").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert not (last / "model.safetensors").exists()
    with pytest.raises(CheckpointError, match="truthgpt export"):
        load_model(last)


def test_an_fsdp_checkpoint_resumes_in_one_process_and_exports_merged(
    tmp_path: Path, fsdp_run: dict, reference: Path
) -> None:
    run_dir = Path(fsdp_run["output_dir"]) / "fsdp"
    sharded = run_dir / "checkpoints" / f"step_{STEPS // 2:06d}"
    # The merged export of the step-4 shards is the reference's step-4 model.
    out = export_checkpoint(sharded, tmp_path / "merged")
    batch = torch.arange(24).reshape(2, 12)
    with torch.no_grad():
        got = load_model(out).eval()(batch).logits
        expected = load_model(reference / "checkpoints" / sharded.name).eval()(batch).logits
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    # One process, no FSDP: accumulation keeps the global batch, the shards are read whole.
    one = {**fsdp_run, "training": {**fsdp_run["training"], "max_steps": STEPS}}
    one["training"].update(parallel="none", grad_accum_steps=4)
    result = train(load(one), resume=True)
    assert result.steps == STEPS
    assert_close(losses(run_dir), losses(reference))
    assert_close(losses(run_dir, "eval"), losses(reference, "eval"))


def test_eval_reads_an_fsdp_checkpoint_from_its_shards(tmp_path: Path, fsdp_run: dict) -> None:
    """`truthgpt eval` merges a sharded checkpoint in one process: the loss is the one the
    FSDP run's own evaluation logged at that step (the same eval_batches blocks)."""
    run_dir = Path(fsdp_run["output_dir"]) / "fsdp"
    step = STEPS // 2
    batches = fsdp_run["training"]["eval_batches"]
    checkpoint = run_dir / "checkpoints" / f"step_{step:06d}"
    result = evaluate_run(checkpoint, max_batches=batches, device="cpu")
    assert result["loss"] == pytest.approx(losses(run_dir, "eval")[step], rel=1e-5, abs=1e-6)
    out = CliRunner().invoke(app, ["eval", str(run_dir), "--max-batches", str(batches)])
    assert out.exit_code == 0 and "perplexity" in out.stdout, out.output
    # Other text is tokenized with the run's tokenizer (a checkpoint of shards holds none).
    text = tmp_path / "more.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    assert evaluate_run(checkpoint, data_paths=[str(text)], device="cpu")["tokens"] > 0


# ---------------------------------------------------------------------------------------------
# A diffusion model across processes


def digits_dist_config(tmp_path: Path, name: str, **training: object) -> dict:
    """The tiny digits model on 2 processes x 2 micro-batches, evaluated, sampled and saved."""
    raw = digits_raw_config(
        tmp_path,
        training={
            "max_steps": 4,
            "batch_size": 8,
            "grad_accum_steps": 2,
            "eval_every": 2,
            "log_every": 1,
            **training,
        },
        checkpoint={"save_every": 2},
        logging={"progress": "none", "tensorboard": False, "plot": False},
        diffusion_training={"samples": {"every": 4, "prompts": ["a handwritten digit one"]}},
    )
    raw["diffusion_training"]["samples"]["steps"] = 2
    return {**raw, "run_name": name}


@pytest.fixture(scope="module")
def digits_ddp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("digits-ddp")
    raw = digits_dist_config(tmp_path, "ddp")
    run_two(tmp_path, raw)
    return Path(raw["output_dir"]) / "ddp"


def test_a_diffusion_model_trains_evaluates_and_saves_on_two_ddp_processes(
    digits_ddp: Path,
) -> None:
    """Each rank draws its own noise, so the losses are not one process's; the evaluation is
    shared out (rank 1 evaluates the second batch): the one-process eval of the saved weights
    gives it only when both ranks hold the same weights, i.e. the gradients were synced."""
    assert sorted(losses(digits_ddp)) == [1, 2, 3, 4]
    evals = losses(digits_ddp, "eval")
    assert sorted(evals) == [0, 2, 4] and evals[4] < evals[0]
    last = digits_ddp / "checkpoints" / "last"
    assert (last / "model_index.json").is_file()  # a diffusers pipeline, written by rank 0
    assert (digits_ddp / "samples" / "step_000004.png").is_file()
    result = evaluate_run(last, max_batches=2, device="cpu")
    assert result["loss"] == pytest.approx(evals[4], rel=1e-5)


def test_a_diffusion_model_under_fsdp_gives_the_ddp_losses(
    tmp_path: Path, digits_ddp: Path
) -> None:
    """FSDP shards the UNet and keeps the frozen text encoder whole on each rank: with each
    rank's noise drawn as under DDP, every step's loss is DDP's; the shards evaluate and
    export to a pipeline diffusers opens."""
    from diffusers import DiffusionPipeline

    from truthgpt.diffusion.pipeline import run_pipeline

    raw = digits_dist_config(tmp_path, "fsdp", parallel="fsdp")
    run_two(tmp_path, raw)
    run_dir = Path(raw["output_dir"]) / "fsdp"
    assert_close(losses(run_dir), losses(digits_ddp))
    assert_close(losses(run_dir, "eval"), losses(digits_ddp, "eval"))
    assert (run_dir / "samples" / "step_000004.png").is_file()
    last = run_dir / "checkpoints" / "last"
    assert (last / "sharded").is_dir() and not (last / "model_index.json").exists()
    with pytest.raises(CheckpointError, match="holds FSDP shards.*truthgpt export"):
        run_pipeline(run_dir)  # what `truthgpt image RUN` opens
    # The caption embeddings are derived again from the text encoder in the shards.
    result = evaluate_run(last, max_batches=2, device="cpu")
    assert result["loss"] == pytest.approx(losses(run_dir, "eval")[4], rel=1e-5)
    pipe = DiffusionPipeline.from_pretrained(export_checkpoint(last, tmp_path / "pipe"))
    reference = DiffusionPipeline.from_pretrained(digits_ddp / "checkpoints" / "last")
    got, expected = pipe.unet.state_dict(), reference.unet.state_dict()
    assert all(torch.allclose(got[k], v, rtol=1e-4, atol=1e-5) for k, v in expected.items())


def test_fsdp_gathers_bf16_weights_reduces_fp32_and_keeps_fp32_shards(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """One process (a group of one), bf16: with fsdp_param_dtype fp32 FSDP computes what plain
    autocast does (the same losses); with auto the weights are gathered in bf16, which moves
    the losses by bf16 rounding only, and the checkpoint's shards stay fp32."""
    runs = {}
    for name, extra in {
        "plain": {},
        "gather32": {"parallel": "fsdp", "fsdp_param_dtype": "fp32"},
        "gather16": {"parallel": "fsdp"},
    }.items():
        raw = dist_config(tmp_path, name, precision="bf16", max_steps=4, **extra)
        runs[name] = losses(train(load(raw)).run_dir)
        if name == "gather16":
            assert "fsdp: weights gathered in bfloat16" in capfd.readouterr().out
    assert_close(runs["gather32"], runs["plain"])
    assert runs["gather16"] != runs["plain"]
    assert_close(runs["gather16"], runs["plain"], rel=2e-2)
    from torch.distributed.checkpoint import FileSystemReader

    last = Path(raw["output_dir"]) / "gather16" / "checkpoints" / "last" / "sharded"
    stored = FileSystemReader(str(last)).read_metadata().state_dict_metadata
    weights = {
        key: meta.properties.dtype
        for key, meta in stored.items()
        if key.startswith("model.") and key.endswith("weight")
    }
    assert weights and set(weights.values()) == {torch.float32}, weights


def test_fp16_under_fsdp_scales_like_one_process(tmp_path: Path) -> None:
    """fp16 with its grad scaler (whose overflow verdict DTensor max-reduces over the ranks):
    two FSDP processes give the losses of one plain process with the same global batch, and
    the scaler's state resumes from the sharded checkpoint."""
    one = train(load(dist_config(tmp_path, "one16", precision="fp16", grad_accum_steps=4)))
    raw = dist_config(tmp_path, "fsdp16", parallel="fsdp", precision="fp16", max_steps=STEPS // 2)
    run_two(tmp_path, raw)
    raw["training"]["max_steps"] = STEPS
    output = run_two(tmp_path, raw, "--resume")
    assert "resumed from" in output
    run_dir = Path(raw["output_dir"]) / "fsdp16"
    assert_close(losses(run_dir), losses(one.run_dir), rel=2e-5)
    from truthgpt.training.checkpoint import read_train_state

    scaler = read_train_state(run_dir / "checkpoints" / "last")["scaler"]
    assert scaler["scale"] > 0  # the scaler ran (a disabled one saves nothing)


def test_muon_and_ema_under_fsdp_match_one_process_and_resume_from_their_shards(
    tmp_path: Path,
) -> None:
    # torch.optim.Muon runs on FSDP2's DTensor shards (its Newton-Schulz matmuls gather what
    # they need); the wrapper's optimizer state goes through DCP and back, and so do the EMA's
    # sharded averages. Muon orthogonalises in bf16, which turns the last-bit differences of a
    # sharded gradient sum into ~1e-5 relative ones: the curves match to 1e-4, and the states
    # in the shards are compared with the reference's directly (a lost momentum moves these
    # curves only ~3e-4).
    muon = {"name": "muon", "lr": 3e-3, "warmup_steps": 2, "schedule": "constant"}
    ema = {"enabled": True, "decay": 0.8, "evaluate": True}  # eval losses are the EMA's
    reference = dist_config(tmp_path, "muonref", grad_accum_steps=4, ema=ema)
    reference["optim"] = muon
    reference_dir = train(load(reference)).run_dir
    expected = losses(reference_dir)
    raw = dist_config(tmp_path, "muonfsdp", parallel="fsdp", max_steps=STEPS // 2, ema=ema)
    raw["optim"] = muon
    run_two(tmp_path, raw)
    run_dir = Path(raw["output_dir"]) / "muonfsdp"
    assert_close(losses(run_dir), {s: v for s, v in expected.items() if s <= STEPS // 2}, 1e-4)
    expected_eval = losses(reference_dir, "eval")
    first_eval = {s: v for s, v in expected_eval.items() if s <= STEPS // 2}
    assert_close(losses(run_dir, "eval"), first_eval, 1e-4)

    config = load(raw)
    task = build_task(config)
    model = task.build_model(task.build_data(run_dir, lambda message: None))
    optimizer = build_optimizer(model, config.optim, torch.device("cpu"))
    average = EMA(model, 0.8)
    initial = [t.clone() for t in average.shadow]  # the fresh model's weights
    name = f"step_{STEPS // 2:06d}"
    load_sharded(run_dir / "checkpoints" / name, model, optimizer, {"ema": average.named_shadow()})
    state_file = reference_dir / "checkpoints" / name / "train_state.pt"
    train_state = torch.load(state_file, weights_only=True)
    # The averages read from the shards are the reference's to Muon's bf16 noise (up to ~3%
    # on the small, zero-centred output projections), and far closer to them than the fresh
    # weights an average that was not loaded would hold.
    off = lambda a, b: float((a - b).norm() / b.norm().clamp(min=1e-12))  # noqa: E731
    for got, start, want in zip(average.shadow, initial, train_state["ema"]["shadow"], strict=True):
        assert off(got, want) < 5e-2 and off(got, want) < 0.1 * off(start, want)
    state = optimizer.state_dict()["state"]
    expected_state = train_state["optimizer"]["state"]
    assert sorted(state) == sorted(expected_state)
    for index, values in expected_state.items():
        assert sorted(values) == sorted(state[index])
        for key, value in values.items():
            # Relative to the tensor's norm: a lost or zeroed state would be 1.0 off; the
            # bf16 orthogonalisation leaves ~1% (squared gradients: exp_avg_sq) after 4 steps.
            error = (state[index][key] - value).norm() / value.norm().clamp(min=1e-12)
            assert error < 5e-2, (index, key, float(error))
    one = {**raw, "training": {**raw["training"], "max_steps": STEPS}}
    one["training"].update(parallel="none", grad_accum_steps=4)
    train(load(one), resume=True)
    assert_close(losses(run_dir), expected, rel=1e-4)
    assert_close(losses(run_dir, "eval"), expected_eval, rel=1e-4)


def test_lora_under_fsdp_matches_one_process_resumes_and_exports(tmp_path: Path) -> None:
    """Frozen base weights sharded with the adapters: the 1-process LoRA losses; the shards
    resume in 1 process; the export of the shards is the 1-process export, merged or not."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = {"enabled": True, "r": 4}
    reference = dist_config(tmp_path, "loraref", grad_accum_steps=4, max_steps=STEPS // 2)
    reference["model"]["lora"] = lora
    reference_dir = train(load(reference)).run_dir
    raw = dist_config(tmp_path, "lorafsdp", parallel="fsdp", max_steps=STEPS // 2)
    raw["model"]["lora"] = lora
    run_two(tmp_path, raw)
    run_dir = Path(raw["output_dir"]) / "lorafsdp"
    assert_close(losses(run_dir), losses(reference_dir))
    name = f"step_{STEPS // 2:06d}"
    batch = torch.arange(24).reshape(2, 12)
    for merge in (True, False):
        got = export_checkpoint(run_dir / "checkpoints" / name, tmp_path / f"got{merge}", merge)
        want = export_checkpoint(
            reference_dir / "checkpoints" / name, tmp_path / f"want{merge}", merge
        )
        assert (got / "adapter").is_dir() == (not merge)
        logits = []
        for folder in (got, want):
            model = AutoModelForCausalLM.from_pretrained(folder)
            if not merge:  # base + adapter, as peft users open it
                model = PeftModel.from_pretrained(model, folder / "adapter")
            with torch.no_grad():
                logits.append(model(batch).logits)
        torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-5)
    one = {**raw, "training": {**raw["training"], "max_steps": STEPS}}
    one["training"].update(parallel="none", grad_accum_steps=4)
    train(load(one), resume=True)
    longer = {**reference, "training": {**reference["training"], "max_steps": STEPS}}
    train(load(longer), resume=True)
    assert_close(losses(run_dir), losses(reference_dir))


def rank_pids(torchrun_pid: int) -> dict[int, int]:
    """{rank: pid} of the workers torchrun started."""
    ranks = {}
    children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        for entry in environ:
            if entry.startswith(b"RANK="):
                ranks[int(entry[5:])] = pid
    return ranks


def test_kill_9_of_one_rank_then_resume_matches(tmp_path: Path) -> None:
    steps = 40
    raw = dist_config(tmp_path, "killed", max_steps=steps, eval_every=20)
    raw["checkpoint"]["save_every"] = 5
    proc = launch(tmp_path, raw)
    metrics = Path(raw["output_dir"]) / "killed" / "metrics.jsonl"
    killed_after = None
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file():
            done = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
            if done and max(done) >= 12:
                os.kill(rank_pids(proc.pid)[1], signal.SIGKILL)
                killed_after = max(done)
                break
        time.sleep(0.005)
    output = proc.communicate(timeout=120)[0].decode()
    assert killed_after is not None, "the run finished before a rank could be killed"
    assert proc.returncode == 1 and "process 1 was ended by SIGKILL" in output, output[-3000:]
    run_dir = metrics.parent
    last = find_resumable(run_dir / "checkpoints", warn=print)
    assert last is not None
    assert torch.load(last / "train_state.pt", weights_only=True)["step"] < steps

    run_two(tmp_path, raw, "--resume")
    reference = train(load({**raw, "run_name": "reference"}, ["training.grad_accum_steps=4"]))
    assert_close(losses(run_dir), losses(reference.run_dir))


def test_ctrl_c_under_nproc_saves_on_every_rank_and_exits_130(tmp_path: Path) -> None:
    raw = dist_config(tmp_path, "ctrlc", max_steps=400, eval_every=200)
    proc = launch(tmp_path, raw, session=True)
    metrics = Path(raw["output_dir"]) / "ctrlc" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and any(
            json.loads(line)["step"] >= 3 for line in metrics.read_text().splitlines()
        ):
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the whole job
            break
        time.sleep(0.01)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, output[-3000:]
    assert "on request; checkpoint saved" in output and "Traceback" not in output
    last = find_resumable(metrics.parent / "checkpoints", warn=print)
    assert last is not None and (last / "train_state.pt").is_file()


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not path.exists():
        time.sleep(0.01)
    assert path.exists(), f"{path} never appeared"


def test_ctrl_c_under_nproc_saves_at_the_next_step_however_far_the_next_log_step(
    tmp_path: Path,
) -> None:
    # The ranks agreed on a stop at log steps only: torch's launcher, which passes the Ctrl-C
    # on, kills them 30 s later, so with log steps further apart than that nothing was saved.
    raw = dist_config(tmp_path, "far", max_steps=100_000, log_every=100_000, eval_every=100_000)
    raw["checkpoint"]["save_every"] = 3
    proc = launch(tmp_path, raw, session=True)
    checkpoints = Path(raw["output_dir"]) / "far" / "checkpoints"
    wait_for(checkpoints / "step_000003", proc)
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, output[-3000:]
    assert "on request; checkpoint saved" in output and "Traceback" not in output, output[-3000:]
    last = find_resumable(checkpoints, warn=print)
    assert last is not None
    stopped = torch.load(last / "train_state.pt", weights_only=True)["step"]
    assert 3 <= stopped < 100_000
    # Stopped between log steps, it resumes as an uninterrupted run trains.
    raw["training"].update(max_steps=stopped + 2, log_every=1)
    run_two(tmp_path, raw, "--resume")
    reference = train(load({**raw, "run_name": "reference"}, ["training.grad_accum_steps=4"]))
    got, expected = losses(checkpoints.parent), losses(reference.run_dir)
    assert sorted(got) == [stopped + 1, stopped + 2]
    assert_close(got, {step: expected[step] for step in got})


def test_kill_9_of_the_launcher_stops_its_processes_and_they_save(tmp_path: Path) -> None:
    # The kernel tells them with a signal (prctl PR_SET_PDEATHSIG); a multi-threaded launcher's
    # death sends it once per thread that goes, and a second SIGTERM stopped them at once,
    # unsaved. None may train on, orphaned; with the rendezvous store gone, they still save.
    raw = dist_config(tmp_path, "orphans", max_steps=100_000, eval_every=100_000)
    raw["checkpoint"]["save_every"] = 100_000
    proc = launch(tmp_path, raw)
    metrics = Path(raw["output_dir"]) / "orphans" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and any(
            json.loads(line)["step"] >= 3 for line in metrics.read_text().splitlines()
        ):
            break
        time.sleep(0.01)
    ranks = rank_pids(proc.pid)
    assert sorted(ranks) == [0, 1]
    os.kill(proc.pid, signal.SIGKILL)
    output = proc.communicate(timeout=120)[0].decode()  # the ranks write to its pipe too
    deadline = time.time() + 60
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in ranks.values()):
        time.sleep(0.1)
    alive = [pid for pid in ranks.values() if Path(f"/proc/{pid}").exists()]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "ranks trained on after their launcher was killed"
    assert "on request; checkpoint saved" in output, output[-3000:]
    last = find_resumable(metrics.parent / "checkpoints", warn=print)
    assert last is not None
    assert 3 <= torch.load(last / "train_state.pt", weights_only=True)["step"] < 100_000


@pytest.mark.parametrize("damaged", [0, 1])  # one rank reads each
def test_an_error_only_one_rank_meets_is_said(tmp_path: Path, damaged: int) -> None:
    # A rank past 0 prints no error (rank 0 says the ones every rank meets): a damaged shard
    # that only it reads was said by no one, under rank 0's traceback of the lost connection.
    shards = tmp_path / "shards"
    shards.mkdir()
    text = inspect.getsource(json)
    for shard in range(2):
        with tarfile.open(shards / f"shard-{shard}.tar", "w") as tar:
            for i in range(40):
                data = text[i * 900 : (i + 1) * 900].encode()
                info = tarfile.TarInfo(f"s{shard}-{i:03d}.txt")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path = shards / f"shard-{damaged}.tar"
    path.write_bytes(path.read_bytes()[: 20 * 1024])  # cut short past its first samples
    raw = dist_config(tmp_path, "damaged", max_steps=100_000, eval_every=100_000, log_every=50)
    raw["data"] = {**raw["data"], "source": "webdataset", "paths": [str(shards / "*.tar")]}
    del raw["data"]["max_documents"]
    raw["data"]["tokenizer"] = {"vocab_size": 300, "train_max_chars": 5_000}  # from shard 0
    proc = launch(tmp_path, raw)
    output = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == 1, output[-3000:]
    assert f"shard-{damaged}.tar is not a readable tar archive" in output, output[-3000:]
    # Rank 0, cut off by rank 1's failure, says so in a line, not a traceback of gloo's.
    assert "Traceback" not in output, output[-3000:]


def test_bad_process_settings_are_errors_naming_the_key(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", str(tmp_path / "x.yaml"), "--nproc", "0"])
    assert result.exit_code == 1 and "--nproc must be a positive number" in result.output
    raw = dist_config(tmp_path, "used")
    (tmp_path / "used.yaml").write_text(yaml.safe_dump(raw))
    args = ["train", str(tmp_path / "used.yaml"), "--nproc", "2"]
    # Refused before any process starts: the flags contradict, or the processes would.
    result = CliRunner().invoke(app, [*args, "--overwrite", "--resume"])
    assert result.exit_code == 1 and "give one of them" in result.output
    result = CliRunner().invoke(app, [*args, "--set", "training.parallel=none"])
    assert result.exit_code == 1 and "training.parallel: none, but 2 processes" in result.output
    # Met by the processes (a used run folder): one message, from rank 0, and no launcher
    # traceback on top of it.
    Path(raw["output_dir"], "used").mkdir(parents=True)
    Path(raw["output_dir"], "used", "metrics.jsonl").write_text("")
    proc = launch(tmp_path, raw)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 1, output
    assert output.count("error:") == 1 and "Traceback" not in output, output
    with pytest.raises(ConfigError, match="training.parallel.*allowed: auto, none, ddp, fsdp"):
        load({"training": {"parallel": "zero3"}})
    config = load(dist_config(tmp_path, "alone", parallel="none"))
    with pytest.raises(ConfigError, match="training.parallel: none, but 2 processes"):
        resolve_parallel(config, world_size=2)
    assert resolve_parallel(load(dist_config(tmp_path, "auto")), world_size=2) == "ddp"
    assert resolve_parallel(load(dist_config(tmp_path, "auto")), world_size=1) == "none"
    # One GPU per process: --nproc 64 on an 8-GPU machine is refused before anything starts
    # (each process would meet cuda:63 in a traceback of its own).
    with pytest.raises(ConfigError, match="64 processes on this machine, but it has 8 GPU"):
        check_gpu_count(64, gpus=8)
    check_gpu_count(8, gpus=8)


def test_fsdp_ranks_past_0_build_on_meta_unless_buffers_need_a_full_build() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from truthgpt.models.decoder import Decoder, DecoderConfig
    from truthgpt.training.distributed import World, build_on_ranks

    shape = {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4}
    native = lambda: Decoder(DecoderConfig(**shape))  # noqa: E731
    rank_1 = World(rank=1, size=2, parallel="fsdp")
    assert all(p.is_meta for p in build_on_ranks(native, rank_1).parameters())
    assert not any(
        p.is_meta for p in build_on_ranks(native, World(size=2, parallel="fsdp")).parameters()
    )
    assert not any(
        p.is_meta
        for p in build_on_ranks(native, World(rank=1, size=2, parallel="ddp")).parameters()
    )
    # transformers' rotary tables are non-persistent buffers: a broadcast of the state dict
    # would not carry them, so such a model is built in full.
    hf_config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    hf = build_on_ranks(lambda: AutoModelForCausalLM.from_config(hf_config), rank_1)
    assert not any(t.is_meta for t in [*hf.parameters(), *hf.buffers()])


def test_scaling_benchmark_runs_on_cpu_processes(tmp_path: Path) -> None:
    # Keeps benchmarks/scaling.py in step with the Trainer (a smoke run of its launch through
    # torch.distributed.run and its table; gloo on CPU says nothing about speed).
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"
    out = tmp_path / "scaling.json"
    args = ["--tiny", "--steps", "3", "--warmup", "1", "--repeats", "1", "--json", str(out)]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(row["parallel"], row["nproc"], row["repeats"]) for row in rows] == [
        ("none", 1, 1),
        ("ddp", 2, 1),
    ]
    assert all(row["tokens_per_second"] > 0 for row in rows)
    assert "| ddp x 2 |" in done.stdout and "efficiency" in done.stdout
