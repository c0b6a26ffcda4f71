#!/usr/bin/env bash
# The data of the 3B and 8B recipes, under data/full (both sizes read the same files; the
# units and the unit language do not depend on the LLM). Each step is skipped when its output
# exists, so a stopped run continues. docs/scale.md lists what each stage reads.
#
#   MHUBERT=/models/mhubert-base-25hz KM1000=/models/mhubert_L11_km1000.bin \
#       bash recipes/3b/prepare_data.sh
#
# Needs: hf (pip install huggingface_hub) and a login where the datasets ask for
# one; a GPU for the unit extraction (DEVICE, default cuda); disk for the audio (several TB).
# MHUBERT: the paper's unit model, mHuBERT, as a transformers HuBERT folder or hub id; KM1000:
# the k-means with 1000 clusters on its layer 11 (a joblib file, as fairseq's km1000 files
# are). Neither is downloaded here: name the copies you have.
# MLS_INCLUDE: which parquet shards of parler-tts/mls_eng to take (default: 30 of its 1,416
# train shards, about 950 h of the 44.7k). TTS_EXTRA: further TTS corpora (hub ids or local
# folders with audio + text columns, "ID[:SPLIT] ...") for the T2C. ECHOX_TRAIN_ARGS: options
# for step 3's `echox train s2t --prepare-data`, e.g. the local model folders of an offline
# cluster: ECHOX_TRAIN_ARGS="--set model.llm.name_or_path=/models/llama-3.2-3b-instruct
# --set model.encoder.name_or_path=/models/whisper-large-v3" (as given to s2t.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${MHUBERT:?set MHUBERT to a transformers-format mHuBERT (folder or hub id)}"
: "${KM1000:?set KM1000 to the k-means file of its layer 11 with 1000 clusters}"
# checked now, not at step 5 after hours of downloads: the k-means is a file; mHuBERT is a
# folder, or a hub id (owner/name) when no such path exists
[ -f "$KM1000" ] || { echo "prepare_data: KM1000=$KM1000 is not a file" >&2; exit 2; }
if [[ "$MHUBERT" == /* || "$MHUBERT" == .* || "$MHUBERT" != */* ]] && [ ! -d "$MHUBERT" ]; then
  echo "prepare_data: MHUBERT=$MHUBERT is not a folder (nor a hub id owner/name)" >&2; exit 2
fi
D=data/full
ECHOX=${ECHOX:-echox}
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}

# 1. EchoX-Dialogues (the layout: tar shards, each a data.json and the wavs it names;
#    read off a third-party loader, not verified here), one folder per shard. The last shard
#    is held out: the evaluation losses of the S2T and Echo recipes.
if [ ! -d "$D/EchoX-Dialogues" ]; then
  hf download KurtDu/EchoX-Dialogues --repo-type dataset --local-dir "$D/EchoX-Dialogues-tar"
  rm -rf "$D/EchoX-Dialogues.part" && mkdir -p "$D/EchoX-Dialogues.part" "$D/EchoX-Dialogues-heldout"
  find "$D/EchoX-Dialogues-tar" -name '*.tar' | sort | while read -r t; do
    n=$(basename "$t" .tar); mkdir -p "$D/EchoX-Dialogues.part/$n"; tar -xf "$t" -C "$D/EchoX-Dialogues.part/$n"
  done
  last=$(ls "$D/EchoX-Dialogues.part" | tail -n 1)
  mv "$D/EchoX-Dialogues.part/$last" "$D/EchoX-Dialogues-heldout/"
  mv "$D/EchoX-Dialogues.part" "$D/EchoX-Dialogues"
fi

# 2. MLS English, a subset of its parquet shards (columns audio, transcript)
if [ ! -d "$D/mls_eng" ]; then
  hf download parler-tts/mls_eng --repo-type dataset \
      --include "${MLS_INCLUDE:-data/train-000[0-2]?-of-01416.parquet}" \
      --local-dir "$D/mls_eng"
fi

# 3. The S2T recipe's hub and local datasets (LibriSpeech, MLS) as local manifests + audio
#    under data/full/hf-audio, once: the 8 processes of a launch then only read manifests.
# shellcheck disable=SC2086  # ECHOX_TRAIN_ARGS is a list of options
$ECHOX train s2t --recipe recipes/3b/s2t.yaml --prepare-data ${ECHOX_TRAIN_ARGS:-}

# 4. TTS pairs: the spoken responses of EchoX-Dialogues (and TTS_EXTRA), and the dialogues
#    with ids, for `units attach`
[ -f "$D/tts/tts.jsonl" ] || $PY recipes/3b/dialogues_tts.py "$D/EchoX-Dialogues" --out "$D/tts" \
    $(for x in ${TTS_EXTRA:-}; do printf -- '--hf %s ' "$x"; done)
[ -f "$D/tts/heldout/tts.jsonl" ] || $PY recipes/3b/dialogues_tts.py "$D/EchoX-Dialogues-heldout" --out "$D/tts/heldout"

# 5. Units: mHuBERT layer 11 + k-means 1000, deduplicated (cached per utterance, resumable)
for s in "" "_heldout"; do
  src="$D/tts/tts.jsonl"; [ -z "$s" ] || src="$D/tts/heldout/tts.jsonl"
  [ -f "$D/units/tts_units$s.jsonl" ] || $ECHOX units extract --manifest "$src" --kmeans "$KM1000" \
      --features "hubert:$MHUBERT" --layer 11 --device "$DEVICE" --skip-bad-audio \
      --out "$D/units/tts_units$s.jsonl"
done

# 6. The unit language (4000 tokens over the 1000 units: recipes/3b/model.yaml)
[ -f "$D/units/language/train_stats.json" ] || $ECHOX units train-language \
    --manifest "$D/units/tts_units.jsonl" --num-units 1000 --vocab-size 4000 --out "$D/units/language"

# 7. Gold units on the dialogues' assistant turns: the baseline (echo_gold.yaml)
[ -f "$D/units/dialogues_units.jsonl" ] || $ECHOX units attach --dialogues "$D/tts/dialogues.jsonl" \
    --tts-units "$D/units/tts_units.jsonl" --on-missing drop --out "$D/units/dialogues_units.jsonl"
[ -f "$D/units/dialogues_units_heldout.jsonl" ] || $ECHOX units attach \
    --dialogues "$D/tts/heldout/dialogues.jsonl" --tts-units "$D/units/tts_units_heldout.jsonl" \
    --on-missing drop --out "$D/units/dialogues_units_heldout.jsonl"
echo "data ready under $D"
