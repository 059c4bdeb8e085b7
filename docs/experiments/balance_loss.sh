#!/usr/bin/env bash
# Balance-loss experiment (docs/experiments/balance-loss.md): four short `dsv2 train` runs from the same seed,
# then `dsv2 expert-stats` on text none of them saw. Usage: bash docs/experiments/balance_loss.sh [OUTDIR]
set -euo pipefail
OUT=${1:-/tmp/balance-loss}
STD=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
mkdir -p "$OUT"
COMMON=(
  "$STD/email" "$STD/json" "$STD/http" "$STD/asyncio" --include '*.py' --seed 0 --threads 1
  --vocab-size 1024 --hidden-size 64 --layers 3 --first-dense 1 --heads 2 --q-lora-rank 0 --kv-lora-rank 32
  --set qk_nope_head_dim=16 --set qk_rope_head_dim=8 --set v_head_dim=16 --set rope_scaling=null
  --intermediate-size 192 --experts 16 --shared-experts 1 --moe-intermediate-size 32 --top-k 4
  --devices 4 --max-devices-per-token 2 --seq-len 128 --batch-size 8 --max-steps 300 --warmup-steps 20 --lr 3e-3
  --eval-every 300 --save-every 300 --log-every 50 --eval-tokens 16384 --format json
)
run() {  # name, extra flags...
  local name=$1; shift
  rm -rf "$OUT/$name"
  dsv2 train "${COMMON[@]}" --out "$OUT/$name" "$@" > "$OUT/$name.train.json"
  dsv2 expert-stats "$STD/xml" --model "$OUT/$name" --seq-len 128 --format json > "$OUT/$name.stats.json"
}
run none
run expert --expert-alpha 0.01
run all --expert-alpha 0.01 --device-alpha 0.05 --comm-alpha 0.02
run all-drop --expert-alpha 0.01 --device-alpha 0.05 --comm-alpha 0.02 --capacity-factor 1.0
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| run | α1 | α2 | α3 | capacity | held-out loss | max/mean L1, L2 | CV L1, L2 | Σf·P expert | Σf·P device | drop in training | drop at 1.0 (simulated) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for name in ("none", "expert", "all", "all-drop"):
    t = json.loads((out / f"{name}.train.json").read_text())
    s = json.loads((out / f"{name}.stats.json").read_text())
    b = json.loads((out / name / "training.json").read_text())["settings"]["balance"]
    layers = s["layers"]
    mom = ", ".join(f"{l['max_over_mean']:.2f}" for l in layers)
    cv = ", ".join(f"{l['cv']:.2f}" for l in layers)
    exp = sum(l["expert_balance"] for l in layers) / len(layers)
    dev = sum(l["device_balance"] for l in layers) / len(layers)
    sim = sum(next(d["assignment_drop_rate"] for d in l["drop"] if d["policy"] == "device" and d["capacity_factor"] == 1.0) for l in layers) / len(layers)
    drop = "—" if t["drop_rate"] is None else f"{100 * t['drop_rate']:.1f}%"
    cap = b["capacity_factor"] or "—"
    print(f"| {name} | {b['expert_alpha']:g} | {b['device_alpha']:g} | {b['comm_alpha']:g} | {cap} | {t['eval_loss']:.3f} | {mom} | {cv} | {exp:.3f} | {dev:.3f} | {drop} | {100 * sim:.1f}% |")
PY
