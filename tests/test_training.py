"""The training loop end to end on tiny real models: loss falls, files land, checkpoints reload."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_raw_config
from transformers import AutoModelForCausalLM

import truthgpt
from truthgpt.config import load
from truthgpt.data import prepare_data
from truthgpt.errors import ConfigError
from truthgpt.models import load_model
from truthgpt.training.callbacks import Callback
from truthgpt.training.checkpoint import verify_checkpoint
from truthgpt.training.optim import build_scheduler, param_groups
from truthgpt.training.run import train
from truthgpt.training.run_folder import prepare_run_dir
from truthgpt.training.trainer import Trainer, build_model

ROOT = Path(__file__).resolve().parents[1]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_thirty_steps_lower_the_loss_and_write_the_run_folder(tmp_path: Path) -> None:
    config = load(tiny_raw_config(tmp_path))
    result = train(config)
    run_dir = result.run_dir
    assert result.steps == 30
    records = read_metrics(run_dir)
    train_losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(train_losses) == 6
    assert train_losses[-1] < train_losses[0] - 0.5
    assert result.final_val_loss < result.initial_val_loss
    assert result.final_val_ppl < result.initial_val_ppl
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 15, 30]
    for record in records:
        if record["kind"] == "train":
            assert {"lr", "tokens_per_second", "grad_norm", "tokens_seen"} <= record.keys()
    for name in ("config.yaml", "loss.png", "tokenizer/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tb").iterdir())
    for name in ("last", "best"):
        folder = run_dir / "checkpoints" / name
        verify_checkpoint(folder)
        assert (folder / "model.safetensors").is_file()
        assert (folder / "tokenizer.json").is_file()
    assert (run_dir / "checkpoints" / "last" / "train_state.pt").is_file()
    # The resolved config in the run folder is itself loadable and equal.
    assert load(run_dir) == config


class SlowEvaluation(Callback):
    """The evaluation at step 5 takes 2 s longer than the training steps around it."""

    def on_eval(self, step: int, metrics: dict) -> None:
        if step == 5:
            time.sleep(2.0)


def test_logged_throughput_leaves_out_evaluation_time(tmp_path: Path) -> None:
    # The log line after an evaluation counted its time as training (3,000 tokens/s where the
    # steps ran at 30,000). Five tiny steps take a fraction of the 2 s the evaluation adds.
    raw = tiny_raw_config(
        tmp_path, training={"max_steps": 10, "log_every": 5, "eval_every": 5, "eval_batches": 1}
    )
    train(load(raw), callbacks=[SlowEvaluation()])
    logged = [r for r in read_metrics(tmp_path / "runs" / "tiny") if r["kind"] == "train"]
    assert [r["step"] for r in logged] == [5, 10]
    window_tokens = logged[1]["tokens_seen"] - logged[0]["tokens_seen"]
    assert window_tokens / logged[1]["tokens_per_second"] < 2.0


def build_trainer(config, tmp_path: Path) -> Trainer:
    prepare_run_dir(config, overwrite=False)
    run_dir = config.run_dir
    data = prepare_data(config, run_dir, log=lambda message: None)
    model = build_model(config, vocab_size=len(data.tokenizer))
    return Trainer(config, model, data, torch.device("cpu"), run_dir, callbacks=[])


def test_checkpoint_reload_reproduces_logits(tmp_path: Path) -> None:
    config = load(tiny_raw_config(tmp_path, training={"max_steps": 6, "eval_every": 100}))
    trainer = build_trainer(config, tmp_path)
    trainer.fit()
    batch = next(iter(trainer.val_batches))["input_ids"]
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(batch).logits
        reloaded = load_model(trainer.run_dir / "checkpoints" / "last").eval()
        got = reloaded(batch).logits
    assert torch.equal(expected, got)


def test_best_checkpoint_follows_the_metric(tmp_path: Path) -> None:
    config = load(tiny_raw_config(tmp_path, training={"max_steps": 10, "eval_every": 5}))
    trainer = build_trainer(config, tmp_path)
    trainer.fit()
    evals = [trainer.evaluate()]
    assert trainer.best_metric is not None
    assert trainer.best_metric <= evals[0]["val_loss"] + 1e-6


def test_hf_arch_trains_through_the_same_loop(tmp_path: Path) -> None:
    raw = tiny_raw_config(
        tmp_path,
        model={
            "arch": "hf",
            "hf_config": {
                "model_type": "gpt_neox",
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "intermediate_size": 64,
                "max_position_embeddings": 64,
            },
        },
        training={"max_steps": 20, "eval_every": 20},
    )
    result = train(load(raw))
    assert result.final_val_loss < result.initial_val_loss
    model = load_model(result.run_dir / "checkpoints" / "last")
    assert type(model).__name__ == "GPTNeoXForCausalLM"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_stay_finite(tmp_path: Path, precision: str) -> None:
    raw = tiny_raw_config(
        tmp_path,
        training={"max_steps": 4, "precision": precision, "eval_every": 4, "grad_accum_steps": 2},
        logging={"progress": "none", "tensorboard": False, "plot": False},
    )
    result = train(load(raw))
    assert math.isfinite(result.final_val_loss)
    # fp16 overflow is the grad scaler's business (it skips and lowers the scale), not an error.
    assert result.nonfinite_skipped == 0


def test_refuses_to_overwrite_a_finished_run(tmp_path: Path) -> None:
    raw = tiny_raw_config(tmp_path, training={"max_steps": 2, "eval_every": 2})
    train(load(raw))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(load(raw))
    result = train(load(raw), overwrite=True)
    assert result.steps == 2


def test_python_train_has_the_cli_choices(tmp_path: Path) -> None:
    raw = tiny_raw_config(tmp_path, training={"max_steps": 2, "eval_every": 2})
    truthgpt.train(load(raw))
    with pytest.raises(ConfigError, match="already holds a run"):
        truthgpt.train(load(raw))
    longer = load(raw, ["training.max_steps=4"])
    assert truthgpt.train(longer, resume=True).steps == 4  # continued from step 2
    assert truthgpt.train(load(raw), overwrite=True).steps == 2


def test_weight_decay_skips_norms_biases_and_embeddings(tmp_path: Path) -> None:
    config = load(tiny_raw_config(tmp_path, model={"arch": "gpt2", "num_kv_heads": None}))
    model = build_model(config, vocab_size=300)
    decay, no_decay = param_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    for name, param in model.named_parameters():
        if param.ndim < 2:
            assert id(param) not in decayed, name
    embeddings = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert embeddings and all(id(e) not in decayed for e in embeddings)
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    untied = [w for w in linears if all(w is not e for e in embeddings)]
    assert untied and all(id(w) in decayed for w in untied)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedules_warm_up_then_decay_to_the_floor(tmp_path: Path, schedule: str) -> None:
    config = load(
        tiny_raw_config(
            tmp_path,
            optim={"lr": 1.0, "warmup_steps": 10, "schedule": schedule, "min_lr_ratio": 0.1},
        )
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, config.optim, max_steps=110)
    lrs = []
    for _ in range(110):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(1.0)
    if schedule == "constant":
        assert lrs[-1] == pytest.approx(1.0)
    else:
        assert lrs[-1] == pytest.approx(0.1, abs=0.02)
        assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))


@pytest.mark.parametrize("arch", ["hf", "llama"])
def test_fine_tune_a_local_checkpoint_like_configs_finetune_local(
    tmp_path: Path, arch: str
) -> None:
    base = train(load(tiny_raw_config(tmp_path, training={"max_steps": 10, "eval_every": 10})))
    best = base.run_dir / "checkpoints" / "best"
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"f{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i}\n" * 20)
    shipped = yaml.safe_load((ROOT / "configs" / "finetune-local.yaml").read_text())
    raw = tiny_raw_config(
        tmp_path,
        run_name=f"ft-{arch}",
        model={"arch": arch, "init_from": str(best)},
        data={
            **shipped["data"],
            "paths": [str(docs / "*.py")],
            "max_seq_len": 32,
            "tokenizer": {"path": str(best)},
        },
        training={"max_steps": 10, "eval_every": 10, "batch_size": 4},
    )
    result = train(load(raw))
    assert result.final_val_loss < result.initial_val_loss
    # Either way the result is an HF Llama folder: transformers and our decoder both open it.
    last = result.run_dir / "checkpoints" / "last"
    assert type(AutoModelForCausalLM.from_pretrained(last)).__name__ == "LlamaForCausalLM"
    assert type(load_model(last)).__name__ == "Decoder"


def test_throughput_benchmark_runs_on_cpu(tmp_path: Path) -> None:
    # Keeps benchmarks/train_throughput.py in step with the Trainer (a smoke run, no timing).
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    script = ROOT / "benchmarks" / "train_throughput.py"
    args = ["--tiny", "--steps", "3", "--warmup", "1", "--runners", "truthgpt", "--repeats", "2"]
    args += ["--variant", "ce:training.fused_loss=true", "--json", str(out)]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "truthgpt:ce" in done.stdout and "2 repeats" in done.stdout
    written = json.loads(out.read_text())
    # The variant takes its turn after the baseline in each repeat, with its own overrides.
    assert [(row["runner"], row["repeat"]) for row in written["repeats"]] == [
        ("truthgpt", 0), ("truthgpt:ce", 0), ("truthgpt", 1), ("truthgpt:ce", 1)
    ]  # fmt: skip
    assert [row["repeats"] for row in written["rows"]] == [2, 2]
    typo = ["--tiny", "--runners", "truthgpt", "--variant", "x:training.fused_los=true"]
    done = subprocess.run([sys.executable, str(script), *typo], capture_output=True, text=True)
    assert done.returncode != 0 and "Did you mean 'training.fused_loss'" in done.stderr


def test_compiled_variants_train_the_eager_steps(tmp_path: Path) -> None:
    """compile_scope: blocks compiles each block in place (checkpoint keys unchanged), and
    compile_mode: reduce-overhead keeps preallocated gradients that backward adds into: both
    train the eager model's per-step losses and weights over accumulated micro-batches (CPU
    inductor, where torch skips the graphs themselves; the GPU test replays them)."""
    from test_resume import step_losses

    losses, weights = {}, {}
    for name, extra in {
        "eager": {"compile": False},
        "blocks": {"compile": True, "compile_scope": "blocks"},
        "graphs": {"compile": True, "compile_mode": "reduce-overhead"},
    }.items():
        training = {"max_steps": 6, "log_every": 1, "eval_every": 6, "grad_accum_steps": 2}
        config = load(tiny_raw_config(tmp_path, run_name=name, training={**training, **extra}))
        losses[name] = step_losses(train(config).run_dir)
        weights[name] = load_model(config.run_dir / "checkpoints" / "last").state_dict()
    assert losses["eager"].keys() == set(range(1, 7))
    for name in ("blocks", "graphs"):
        assert losses[name].keys() == losses["eager"].keys()
        for step, loss in losses["eager"].items():
            assert losses[name][step] == pytest.approx(loss, rel=1e-5), (name, step)
        assert weights[name].keys() == weights["eager"].keys()
        for key, value in weights["eager"].items():
            torch.testing.assert_close(weights[name][key], value, rtol=1e-4, atol=1e-5)


def test_per_block_compile_needs_repeated_blocks() -> None:
    from truthgpt.training.compiling import compile_blocks

    with pytest.raises(ConfigError, match="compile_scope: blocks found no repeated blocks"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)), "default")
    with pytest.raises(ConfigError, match="compile_scope") as error:
        load({**tiny_raw_config(Path("/tmp")), "training": {"compile_scope": "layers"}})
    assert "allowed: model, blocks" in str(error.value)
