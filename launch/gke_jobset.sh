#!/usr/bin/env bash
# Renders launch/gke_jobset.yaml for an image, TPU slice, config and
# overrides, and submits it with `kubectl apply -f -`.
#
# Usage:
#   launch/gke_jobset.sh [options] [CONFIG [key=value ...]]
#
# Options:
#   --image IMAGE     container image with the package (launch/Dockerfile)
#   --slice SLICE     v5e-16 (default), v5e-32, v5e-64, v4-16, v4-32 or v4-64
#   --name NAME       JobSet name (default: from the manifest)
#   --bucket BUCKET   GCS bucket mounted at /gcs in every pod
#   --dry-run         print the command and the rendered manifest, submit
#                     nothing (or DRY_RUN=1)
#
# Without CONFIG the manifest's own arguments are kept. Needs PyYAML (the
# package's virtual environment has it; PYTHON picks the interpreter).
#
# Example (Gemma-2B, paper hyperparameters, on a v4-32):
#   launch/gke_jobset.sh --slice v4-32 --image us-docker.pkg.dev/p/bitune/bitune-jax:latest \
#       --bucket my-bucket configs/gemma2b_instruct.yaml \
#       model.source=/gcs/models/gemma-2b train.output_dir=/gcs/runs/gemma2b_bitune
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }

dry_run=${DRY_RUN:-0}
image=""
slice=v5e-16
name=""
bucket=""
while [ $# -gt 0 ]; do
  case "$1" in
    --image) image=$2; shift 2 ;;
    --slice) slice=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --bucket) bucket=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) break ;;
  esac
done

# slice -> GKE accelerator, topology, hosts, chips per host
case "$slice" in
  v5e-16) tpu=(tpu-v5-lite-podslice 4x4 4 4) ;;
  v5e-32) tpu=(tpu-v5-lite-podslice 4x8 8 4) ;;
  v5e-64) tpu=(tpu-v5-lite-podslice 8x8 16 4) ;;
  v4-16) tpu=(tpu-v4-podslice 2x2x2 2 4) ;;
  v4-32) tpu=(tpu-v4-podslice 2x2x4 4 4) ;;
  v4-64) tpu=(tpu-v4-podslice 2x4x4 8 4) ;;
  *) echo "error: --slice $slice is not one of v5e-16, v5e-32, v5e-64, v4-16, v4-32, v4-64" >&2; exit 2 ;;
esac

manifest=$(dirname "$0")/gke_jobset.yaml
rendered=$("${PYTHON:-python3}" - "$manifest" "$image" "$name" "$bucket" "${tpu[@]}" "$@" <<'EOF'
import sys

import yaml

path, image, name, bucket, accelerator, topology, hosts, chips, *train_args = sys.argv[1:]
doc = yaml.safe_load(open(path))
job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
pod = job["template"]["spec"]
container = pod["containers"][0]
job["parallelism"] = job["completions"] = int(hosts)
pod["nodeSelector"] = {"cloud.google.com/gke-tpu-accelerator": accelerator,
                       "cloud.google.com/gke-tpu-topology": topology}
container["resources"]["limits"]["google.com/tpu"] = int(chips)
if image:
    container["image"] = image
if name:
    doc["metadata"]["name"] = name
if bucket:
    pod["volumes"][0]["csi"]["volumeAttributes"]["bucketName"] = bucket
if train_args:
    container["args"] = train_args
print(yaml.safe_dump(doc, sort_keys=False), end="")
EOF
)

if [ "$dry_run" = 1 ]; then
  echo "kubectl apply -f - <<'EOF'"
  printf '%s\n' "$rendered"
  echo "EOF"
  exit 0
fi
echo "+ kubectl apply -f -  (the manifest rendered from $manifest for $slice)" >&2
printf '%s\n' "$rendered" | kubectl apply -f -
