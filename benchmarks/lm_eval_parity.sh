#!/usr/bin/env bash
# lm-evaluation-harness against the server: the loglikelihoods that `local-completions` gets
# from `truthgpt serve` (echo + logprobs) next to those of lm-eval's own `hf` backend on the same
# weights, on a small multiple-choice task built from local files (no hub needed). lm-eval
# tokenizes through the server's /tokenize (its tokenizer_backend auto finds it).
#   bash benchmarks/lm_eval_parity.sh [WORK_DIR]     (from the repo root, project venv in .venv)
# lm-eval goes in a venv of its own: python3.11 -m venv /tmp/lmeval &&
#   /tmp/lmeval/bin/pip install torch==2.13.0 "lm-eval[api]" transformers accelerate
set -eu
work=${1:-/tmp/lm-parity}; lmeval=${LMEVAL_VENV:-/tmp/lmeval}; port=${PORT:-8123}
mkdir -p "$work/tasks"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PYTHONPATH=tests .venv/bin/python - "$work" <<'PY'
import json, random, sys
from pathlib import Path
from serving_fixtures import make_model_folder

work = Path(sys.argv[1])
make_model_folder(work / "model")
random.seed(0)
words = ["import", "return", "class", "def", "self", "value", "None", "True", "print", "lambda"]
with open(work / "mc.jsonl", "w") as f:
    for _ in range(24):
        question = "def f(x):\n    " + " ".join(random.choice(words) for _ in range(4))
        choices = [" " + " ".join(random.choice(words) for _ in range(2)) for _ in range(3)]
        f.write(json.dumps({"question": question, "choices": choices, "answer": random.randrange(3)}) + "\n")
(work / "tasks" / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {work}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
PY
.venv/bin/truthgpt serve "$work/model" --port "$port" --device cpu --served-model-name tiny \
    > "$work/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null' EXIT
for _ in $(seq 60); do curl -sf "localhost:$port/health" > /dev/null && break; sleep 1; done
common=(--tasks tiny_mc --include_path "$work/tasks" --log_samples)
"$lmeval/bin/lm_eval" --model local-completions "${common[@]}" --output_path "$work/api" \
    --model_args "model=tiny,base_url=http://127.0.0.1:$port/v1/completions" 2>&1 \
    | grep -i "remote tokenizer\|tiny_mc"  # it should find the server's /tokenize
"$lmeval/bin/lm_eval" --model hf "${common[@]}" --output_path "$work/hf" --device cpu \
    --model_args "pretrained=$work/model,dtype=float32" 2>&1 | tail -3
python3 - "$work" <<'PY'
import glob, json, sys

def samples(name):
    path = sorted(glob.glob(f"{sys.argv[1]}/{name}/**/samples_tiny_mc_*.jsonl", recursive=True))[-1]
    return {row["doc_id"]: row for row in map(json.loads, open(path))}

api, hf = samples("api"), samples("hf")
pairs = [(a[0], b[0]) for d in hf for a, b in zip(api[d]["resps"], hf[d]["resps"])]
worst = max(abs(float(a[0]) - float(b[0])) for a, b in pairs)
greedy = all(str(a[1]) == str(b[1]) for a, b in pairs)
acc = [sum(rows[d]["acc"] for d in rows) / len(rows) for rows in (api, hf)]
print(f"{len(pairs)} loglikelihoods: max |served - hf| {worst:.2e}; greedy flags equal: {greedy}; "
      f"acc served {acc[0]:.4f} vs hf {acc[1]:.4f}")
PY
