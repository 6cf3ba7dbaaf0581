#!/usr/bin/env bash
# Launch `maskstream preprocess` on Google Cloud Dataflow.
#
#   deploy/dataflow/launch.sh run      [flags] [-- extra job/Beam flags]   submit a job from this machine
#   deploy/dataflow/launch.sh image    [flags]                             build and push the container image
#   deploy/dataflow/launch.sh template [flags]                             build the flex template spec on GCS
#   deploy/dataflow/launch.sh flex     [flags] [-- extra job flags]        run the flex template
#
# Flags (environment variables of the same name in capitals work too):
#   --project P        GCP project                                 ($PROJECT, required)
#   --region R         Dataflow region, e.g. us-central1           ($REGION, required)
#   --bucket gs://B    staging/temp bucket (also holds the template spec)   ($BUCKET, required)
#   --input GLOB       e.g. gs://B/corpus/*.jsonl.gz               (run, flex)
#   --tokenizer FILE   tokenizer.json on GCS                       (run, flex)
#   --output PREFIX    e.g. gs://B/shards/run1                     (run, flex)
#   --image IMAGE      container image (Artifact Registry); with it workers use the image, without it they
#                      install a worker package built from deploy/dataflow/setup.py (dynamic masking only)
#   --workers N        max workers (default 10)
#   --machine TYPE     worker machine type (default n2-standard-4)
#   --dry-run          build and check the job graph offline, submit nothing (run only)
# Everything after `--` goes to the job unchanged, e.g. -- --seq-len 512 --masking static --static-copies 10
set -euo pipefail

cmd=${1:-}; shift || true
PROJECT=${PROJECT:-} REGION=${REGION:-} BUCKET=${BUCKET:-} INPUT=${INPUT:-} TOKENIZER=${TOKENIZER:-}
OUTPUT=${OUTPUT:-} IMAGE=${IMAGE:-} WORKERS=${WORKERS:-10} MACHINE=${MACHINE:-n2-standard-4} DRY=""
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) PROJECT=$2; shift 2 ;;   --region) REGION=$2; shift 2 ;;
    --bucket) BUCKET=$2; shift 2 ;;     --input) INPUT=$2; shift 2 ;;
    --tokenizer) TOKENIZER=$2; shift 2 ;; --output) OUTPUT=$2; shift 2 ;;
    --image) IMAGE=$2; shift 2 ;;       --workers) WORKERS=$2; shift 2 ;;
    --machine) MACHINE=$2; shift 2 ;;   --dry-run) DRY="--dry_run=True"; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "launch.sh: unknown flag $1 (see the header of this file)" >&2; exit 2 ;;
  esac
done
need() { for v in "$@"; do [[ -n "${!v}" ]] || { echo "launch.sh $cmd: --${v,,} is required" >&2; exit 2; }; done; }
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
TEMPLATE="$BUCKET/templates/maskstream-preprocess.json"

case "$cmd" in
  run)
    need PROJECT REGION BUCKET INPUT TOKENIZER OUTPUT
    if [[ -n "$IMAGE" ]]; then
      WORKER=(--sdk_container_image="$IMAGE" --experiments=use_runner_v2)
    else   # a staging folder holding only what workers need, with deploy/dataflow/setup.py as its setup.py
      STAGE=$(mktemp -d); trap 'rm -rf "$STAGE"' EXIT
      mkdir "$STAGE/maskstream" && cp "$ROOT/maskstream/__init__.py" "$STAGE/maskstream/"
      cp -r "$ROOT/pipeline" "$ROOT/loader" "$STAGE/" && cp "$ROOT/deploy/dataflow/setup.py" "$STAGE/"
      sed -n 's/^ *"\(torch==[^"]*\)",*$/\1/p' "$ROOT/pyproject.toml" > "$STAGE/torch-requirement.txt"
      WORKER=(--setup_file="$STAGE/setup.py")
    fi
    cd "$ROOT" && "$PY" -m maskstream.pipeline.run --input "$INPUT" --tokenizer "$TOKENIZER" --output "$OUTPUT" \
      --runner=DataflowRunner --project="$PROJECT" --region="$REGION" \
      --temp_location="$BUCKET/tmp" --staging_location="$BUCKET/staging" \
      --max_num_workers="$WORKERS" --worker_machine_type="$MACHINE" "${WORKER[@]}" $DRY "${EXTRA[@]}" ;;
  image)
    need IMAGE
    cd "$ROOT" && docker build -f deploy/dataflow/Dockerfile -t "$IMAGE" . && docker push "$IMAGE" ;;
  template)
    need BUCKET IMAGE
    gcloud dataflow flex-template build "$TEMPLATE" --image "$IMAGE" --sdk-language PYTHON \
      --metadata-file "$ROOT/deploy/dataflow/metadata.json" ;;
  flex)
    need PROJECT REGION BUCKET INPUT TOKENIZER OUTPUT IMAGE
    params="input=$INPUT,tokenizer=$TOKENIZER,output=$OUTPUT,sdk_container_image=$IMAGE"
    for ((i = 0; i < ${#EXTRA[@]}; i += 2)); do   # -- --seq_len 512 -> seq_len=512
      params+=",${EXTRA[i]#--}=${EXTRA[i+1]}"
    done
    gcloud dataflow flex-template run "maskstream-$(date +%Y%m%d-%H%M%S)" --project "$PROJECT" \
      --region "$REGION" --template-file-gcs-location "$TEMPLATE" --temp-location "$BUCKET/tmp" \
      --max-workers "$WORKERS" --worker-machine-type "$MACHINE" --parameters "$params" ;;
  *) sed -n '2,24p' "$0"; exit 2 ;;
esac
