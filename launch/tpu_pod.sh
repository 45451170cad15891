#!/usr/bin/env bash
# Runs `bitune-jax train` on every worker of a Cloud TPU VM slice (v4-32,
# v5e-16, ...). Every host must run the same program, so every gcloud call
# uses --worker=all; jax.distributed finds the coordinator, process count and
# process id on TPU VMs by itself.
#
# Steps (the first two are skipped with --skip-setup):
#   1. pack the committed tree (git archive HEAD) and copy it to every worker;
#   2. on every worker: unpack into REMOTE_DIR, create REMOTE_DIR/.venv and
#      pip install the package with jax[tpu];
#   3. on every worker: bitune-jax train CONFIG [key=value ...].
#
# Usage:
#   launch/tpu_pod.sh [options] CONFIG [key=value ...]
#
# Options (or the environment variables in brackets):
#   --tpu NAME           TPU VM name [TPU_NAME] (required)
#   --zone ZONE          its zone [ZONE] (required)
#   --project PROJECT    GCP project [PROJECT] (default: gcloud's)
#   --remote-dir DIR     code folder on the workers, relative to home
#                        [REMOTE_DIR] (default: bitune_jax)
#   --skip-setup         do not copy or install; run step 3 only
#   --dry-run            print the commands, run nothing [DRY_RUN=1]
#
# CONFIG and the model it names are read on every worker (relative to
# REMOTE_DIR), and train.output_dir must be a folder every worker sees at the
# same path (NFS / Filestore, or a bucket mounted with GCS FUSE): orbax
# writes one checkpoint from all hosts together.
#
# Example (Gemma-2B, paper hyperparameters, on a v5e-16):
#   launch/tpu_pod.sh --tpu my-v5e-16 --zone us-west4-a configs/gemma2b_instruct.yaml \
#       model.source=/mnt/shared/models/gemma-2b train.output_dir=/mnt/shared/runs/gemma2b_bitune
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }

dry_run=${DRY_RUN:-0}
tpu=${TPU_NAME:-}
zone=${ZONE:-}
project=${PROJECT:-}
remote_dir=${REMOTE_DIR:-bitune_jax}
setup=1
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu) tpu=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --remote-dir) remote_dir=$2; shift 2 ;;
    --skip-setup) setup=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 1 ] || [ -z "$tpu" ] || [ -z "$zone" ]; then
  echo "error: need --tpu, --zone and CONFIG" >&2
  usage >&2
  exit 2
fi
config=$1
shift

repo_root=$(cd "$(dirname "$0")/.." && pwd)
tarball="${TMPDIR:-/tmp}/bitune_jax_src.tar.gz"
where=(--zone="$zone")
if [ -n "$project" ]; then where+=(--project="$project"); fi

# Words joined into one shell command line, each quoted only where needed.
quote() {
  local out="" w
  for w in "$@"; do
    case "$w" in
      '' | *[!A-Za-z0-9_./:=@%+,-]*) w="'${w//\'/\'\\\'\'}'" ;;
    esac
    out+="${out:+ }$w"
  done
  printf '%s' "$out"
}

# What runs on every worker (in its home folder).
remote="set -euo pipefail; "
if [ "$setup" = 1 ]; then
  remote+="mkdir -p $(quote "$remote_dir"); tar -xzf bitune_jax_src.tar.gz -C $(quote "$remote_dir"); "
  remote+="cd $(quote "$remote_dir"); python3 -m venv .venv; .venv/bin/pip install -q -U pip; "
  remote+=".venv/bin/pip install -q -e . 'jax[tpu]'; "
else
  remote+="cd $(quote "$remote_dir"); "
fi
remote+=".venv/bin/bitune-jax train $(quote "$config" "$@")"

commands=()
if [ "$setup" = 1 ]; then
  commands+=("$(quote git -C "$repo_root" archive --format=tar.gz -o "$tarball" HEAD)")
  commands+=("$(quote gcloud compute tpus tpu-vm scp "$tarball" "$tpu:bitune_jax_src.tar.gz" --worker=all "${where[@]}")")
fi
commands+=("$(quote gcloud compute tpus tpu-vm ssh "$tpu" --worker=all "${where[@]}" --command "$remote")")

for c in "${commands[@]}"; do
  if [ "$dry_run" = 1 ]; then
    echo "$c"
  else
    echo "+ $c" >&2
    eval "$c"
  fi
done
