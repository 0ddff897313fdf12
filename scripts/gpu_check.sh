#!/usr/bin/env bash
# The project's one GPU script, run on the device machine from the repository root:
#   1. the model-vs-transformers and scheduler tests on CUDA (our engine on the GPU, transformers on the CPU), with
#      the default attention backend (triton on CUDA), and the Triton kernels against the torch backend
#   2. the benchmarks at real model shapes (random weights), beside transformers' generate: bench.fastpath (issue
#      15's table) and bench.offline per preset
# Needs .gpu/tokenizer (SmolLM2's tokenizer saved in HF layout) carried along: the GPU image has no GGUF reader.
# Logs go to $OUT; the last lines printed are the benchmark tables.
set -uo pipefail
# The GPU image lacks the server's packages: `../shared/device/wheels.sh openai distro jiter httpx2 httpcore2
# annotated-doc opentelemetry-api importlib-metadata zipp truststore anyio h11 click prometheus-client av xgrammar
# apache-tvm-ffi jsonschema referencing rpds-py attrs jsonschema-specifications` fetches them into .whl/, carried
# along with .gpu.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
MMSERVE_TEST_TOKENIZER_DIR=$PWD/.gpu/tokenizer python3 -m pytest -q -p no:cacheprovider \
  tests/models/test_text_models.py tests/models/test_qwen2_vl.py tests/models/test_qwen2_5_vl.py \
  tests/models/test_qwen3_vl.py tests/models/test_llava.py tests/models/test_llava_next.py \
  tests/models/test_llava_onevision.py tests/models/test_llava_next_video.py tests/models/test_gemma3.py \
  tests/models/test_pixtral.py tests/models/test_mistral3.py tests/models/test_internvl.py tests/models/test_janus.py tests/models/test_mllama.py tests/models/test_phi4_multimodal.py \
  tests/models/test_glm4v.py tests/models/test_glm4v_moe.py tests/models/test_qwen3_omni.py \
  tests/models/test_gemma2.py tests/models/test_gme_qwen2_vl.py tests/models/test_clip.py tests/models/test_embeddings.py \
  tests/scheduler tests/layers tests/cache tests/runner tests/constrained \
  tests/multimodal tests/server/test_openai_api.py tests/server/test_multimodal_api.py \
  tests/server/test_errors.py tests/attention 2>&1 | tee "$OUT/tests.log" | tail -15
# the Triton attention kernels against the torch backend at real shapes, and their timing per layer call
python3 scripts/triton_check.py 2>&1 | tee "$OUT/triton_check.log" | tail -3
# the fast path (Triton, graphs, overlap) against the torch backend on a 1B model in bf16 (>= 99% where the
# reference's choice is clear), and what the in-process Engine adds per request over EngineCore (<= 1 ms)
python3 scripts/backend_agreement.py --preset llama-3.2-1b --tokenizer-dir .gpu/tokenizer 2>&1 \
  | tee "$OUT/agreement.log" | tail -1
python3 scripts/engine_overhead.py --preset llama-3.1-8b --tokenizer-dir .gpu/tokenizer 2>&1 \
  | tee "$OUT/overhead.log" | tail -1
# issue 15's table (batch-1 decode against the copy floor, time to first token, offline T2/T3, transformers beside);
# FASTPATH=0 skips it (about 3 minutes)
if [ "${FASTPATH:-1}" != 0 ]; then
  python3 -m mmserve.bench.fastpath --preset llama-3.1-8b --tokenizer-dir .gpu/tokenizer --json "$OUT/fastpath.json" \
    2>&1 | tee "$OUT/fastpath.log" | tail -12
fi
# constrained decoding's cost (issue 18): batch 64 with and without a JSON schema
python3 scripts/bench_structured.py --preset llama-3.1-8b --tokenizer-dir .gpu/tokenizer 2>&1 \
  | tee "$OUT/structured.log" | tail -3
# issue 16's table (images: V1 throughput, V2 time to first token, V3 decode, V5 video); MULTIMODAL=0 skips it
if [ "${MULTIMODAL:-1}" != 0 ]; then
  python3 -m mmserve.bench.multimodal --preset qwen2.5-vl-7b --tokenizer-dir .gpu/tokenizer \
    --json "$OUT/multimodal.json" 2>&1 | tee "$OUT/multimodal.log" | tail -10
fi
# issue 17's rows, one per family (LLaVA-1.5-7B, Gemma-3-12B, Mistral-Small-3.1-24B, InternVL3-8B); FAMILIES="" skips
for preset in ${FAMILIES-llava-1.5-7b gemma-3-12b mistral-small-3.1-24b internvl3-8b}; do
  python3 -m mmserve.bench.families --preset "$preset" --tokenizer-dir .gpu/tokenizer --runs 1 \
    --json "$OUT/family_$preset.json" 2>&1 | tee "$OUT/family_$preset.log" | tail -8
done
# issue 20's rows (GLM-4.1V-9B, Llama-3.2-11B-Vision, Phi-4-multimodal, the Qwen3-Omni-30B-A3B thinker, GLM-4.5V cut
# to 12 of its 46 layers to fit one GPU); FAMILIES_II="" skips them (about 12 minutes)
for preset in ${FAMILIES_II-glm-4.1v-9b llama-3.2-11b-vision phi-4-multimodal qwen3-omni-30b-a3b glm-4.5v}; do
  extra=()
  if [ "$preset" = glm-4.5v ]; then extra=(--config-override '{"text_config": {"num_hidden_layers": 12}}'); fi
  python3 -m mmserve.bench.families --preset "$preset" --tokenizer-dir .gpu/tokenizer --runs 1 --hf-requests 32 \
    "${extra[@]}" --json "$OUT/family_$preset.json" 2>&1 | tee "$OUT/family_$preset.log" | tail -8
done
# issue 21's row: embedding throughput at 512 tokens (gte-Qwen2-1.5B shape) beside transformers' AutoModel
python3 -m mmserve.bench.embeddings --preset gte-qwen2-1.5b --tokenizer-dir .gpu/tokenizer \
  --json "$OUT/embeddings.json" 2>&1 | tee "$OUT/embeddings.log" | tail -6
# on two or more GPUs (issue 19): tp 2 against tp 1 on tiny models (NCCL, float32, graphs), T1/T2 at tp 2, the
# collectives' time per decode step, and the Qwen2.5-VL-32B shape's image workload at tp 2
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  MMSERVE_TEST_TOKENIZER_DIR=$PWD/.gpu/tokenizer python3 -m pytest -q -p no:cacheprovider \
    tests/distributed/test_tensor_parallel.py 2>&1 | tee "$OUT/tp_tests.log" | tail -3
  python3 -m mmserve.bench.fastpath --preset llama-3.1-8b --tokenizer-dir .gpu/tokenizer --only T1,T2 --no-hf \
    --tp-size 2 2>&1 | tee "$OUT/fastpath_tp2.log" | tail -8
  python3 scripts/profile_tp.py --preset llama-3.1-8b --tokenizer-dir .gpu/tokenizer --tp-size 2 --batch 1 64 \
    2>&1 | tee "$OUT/profile_tp.log" | tail -4
  python3 -m mmserve.bench.multimodal --preset qwen2.5-vl-32b --tokenizer-dir .gpu/tokenizer --only V1 --no-hf \
    --tp-size 2 2>&1 | tee "$OUT/v1_32b_tp2.log" | tail -6
fi
# PRESETS="" runs the tests only; PRESETS=qwen3-30b-a3b the MoE shape (about 90 s more, 61 GB of weights)
for preset in ${PRESETS-qwen2.5-0.5b llama-3.1-8b}; do
  python3 -m mmserve.bench.offline --preset "$preset" --tokenizer-dir .gpu/tokenizer \
    --num-prompts "${NUM_PROMPTS:-64}" --input-len "${INPUT_LEN:-256}" --output-len "${OUTPUT_LEN:-128}" \
    --hf-reference --hf-batch-size "${HF_BATCH:-64}" 2>&1 | tee "$OUT/bench_$preset.log" | tail -4
done
