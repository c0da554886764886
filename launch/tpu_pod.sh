#!/usr/bin/env bash
# Train jaxad on a Cloud TPU VM pod slice: create it, copy this checkout to every worker,
# install, run the same command on all workers, fetch the results, tear it down.
#
#   launch/tpu_pod.sh create|copy|install|run|fetch|delete|all
#
# Every setting is an environment variable (defaults in brackets):
#   TPU_NAME [jaxad-pod]  ZONE [us-central2-b]  ACCELERATOR_TYPE [v4-32]
#   TPU_VERSION [tpu-ubuntu2204-base]  PROJECT [gcloud's default project]
#   CREATE_FLAGS [] extra flags for `create`, e.g. "--spot" or "--preemptible"
#   REMOTE_DIR [jaxad] checkout directory on the workers (relative to the home directory)
#   CONFIG [configs/csi_cifar.py]
#   BUCKET [] a GCS bucket the TPU's service account can write; WORKDIR defaults to
#     gs://$BUCKET/jaxad_runs/$TPU_NAME
#   WORKDIR [gs://$BUCKET/jaxad_runs/$TPU_NAME] the run's workdir: a gs:// URL (the normal
#     way: every worker sees it, and it outlives a preempted VM) or a path every worker
#     sees (a relative path is under the workers' home directory)
#   MAX_ATTEMPTS [20] `run` reruns the same command after a preemption until results.json
#     exists, at most this many times; RETRY_SECS [30] pause between attempts
#   TRAIN_FLAGS [] extra flags for jaxad.main, e.g. "--config.batch_size=1024"
#   JAX_SPEC ["jax[tpu]>=0.7,<0.13"] what `install` adds to `pip install -e .`
#   FETCH_DIR [./tpu_results/$TPU_NAME] where `fetch` copies worker 0's workdir
#   KEEP_TPU [0] `all` deletes the TPU at the end (even after a failure) unless KEEP_TPU=1
#   DRY_RUN [0] 1: print the gcloud commands instead of running them
#
# Example (a v4-32 spot slice: 4 hosts x 4 chips, one process per host):
#   TPU_NAME=csi-c10 ACCELERATOR_TYPE=v4-32 CREATE_FLAGS=--spot BUCKET=my-bucket \
#     CONFIG=configs/scaling_cifar.py:epochs=200 \
#     TRAIN_FLAGS="--config.batch_size=2048 --config.optim.lr_rule=sqrt" launch/tpu_pod.sh all
#
# Every worker runs `python3 -m jaxad.main ... --distributed=auto`: on a TPU pod
# jax.distributed.initialize() finds the coordinator, process count and id by itself.
# Only process 0 writes config.json, metrics.jsonl and results.json; every process writes
# its shards of the Orbax checkpoints, so WORKDIR must be one place all workers see: a
# gs:// URL (jaxad writes it directly), or a shared filesystem.
# Preemption: a spot/preemptible TPU gets SIGTERM; jaxad saves a checkpoint at the step in
# flight on every host and exits non-zero. `run` then recreates the TPU if it was taken
# away, and reruns the same command, which resumes from that step, until results.json
# exists. Exit status 1 (a bad config or input) is not retried; 75 (the workdir is still
# held by a live run of the old job) is.
# The CIFAR-10 data must be readable on every worker at the config's data path (a gs:// URL
# works: each worker copies it to a local cache once).
set -euo pipefail

TPU_NAME=${TPU_NAME:-jaxad-pod}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
TPU_VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}
PROJECT=${PROJECT:-}
CREATE_FLAGS=${CREATE_FLAGS:-}
REMOTE_DIR=${REMOTE_DIR:-jaxad}
CONFIG=${CONFIG:-configs/csi_cifar.py}
BUCKET=${BUCKET:-}
if [[ -z "${WORKDIR:-}" ]]; then
  if [[ -z "$BUCKET" ]]; then
    echo "set BUCKET (a GCS bucket every worker can write) or WORKDIR" >&2
    exit 2
  fi
  WORKDIR=gs://$BUCKET/jaxad_runs/$TPU_NAME
fi
MAX_ATTEMPTS=${MAX_ATTEMPTS:-20}
RETRY_SECS=${RETRY_SECS:-30}
TRAIN_FLAGS=${TRAIN_FLAGS:-}
JAX_SPEC=${JAX_SPEC:-jax[tpu]>=0.7,<0.13}
FETCH_DIR=${FETCH_DIR:-./tpu_results/$TPU_NAME}
KEEP_TPU=${KEEP_TPU:-0}
if [[ ! "$REMOTE_DIR" =~ ^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$ || "$REMOTE_DIR" == *..* ]]; then
  echo "REMOTE_DIR=$REMOTE_DIR: give a plain path under the workers' home directory" >&2
  exit 2
fi
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

GCLOUD_FLAGS=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then
  GCLOUD_FLAGS+=(--project="$PROJECT")
fi

gcloud_cmd() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' gcloud "$@"
    echo
  else
    gcloud "$@"
  fi
}

on_all_workers() {  # on_all_workers 'shell command'
  gcloud_cmd compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$1"
}

create() {
  # shellcheck disable=SC2086  # CREATE_FLAGS is a list of flags
  gcloud_cmd compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$TPU_VERSION" $CREATE_FLAGS
}

copy() {
  # A clean copy of the working tree (no .git, caches or run directories), then to every worker.
  local stage
  stage=$(mktemp -d)
  tar -C "$REPO_DIR" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' \
    --exclude=workdirs --exclude=tpu_results -cf - . | (mkdir -p "$stage/jaxad" && tar -C "$stage/jaxad" -xf -)
  on_all_workers "rm -rf ~/$REMOTE_DIR"  # a fresh copy: no stale files from an earlier one
  gcloud_cmd compute tpus tpu-vm scp --recurse "$stage/jaxad" "$TPU_NAME:$REMOTE_DIR" \
    "${GCLOUD_FLAGS[@]}" --worker=all
  rm -rf "$stage"
}

install() {
  on_all_workers "cd ~/$REMOTE_DIR && python3 -m pip install -q -U pip && \
python3 -m pip install -q -e '.[gcs]' '$JAX_SPEC' && python3 -c 'import jax; print(jax.device_count(), jax.local_device_count())'"
}

remote_workdir() {  # $WORKDIR for the workers' shell: relative = under their home directory
  if [[ "$WORKDIR" == /* || "$WORKDIR" == *://* ]]; then echo "$WORKDIR"; else echo "\$HOME/$WORKDIR"; fi
}

tpu_state() {  # READY, PREEMPTED, ... ('' when it does not exist)
  gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --format='value(state)' \
    2>/dev/null || true
}

finished() {  # WORKDIR/results.json exists: the run trained and scored
  if [[ "$WORKDIR" == gs://* ]]; then
    gcloud storage ls "$WORKDIR/results.json" >/dev/null 2>&1
  else
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker=0 \
      --command="test -f $(remote_workdir)/results.json" >/dev/null 2>&1
  fi
}

run() {  # the same command on every worker, again after each preemption, until results.json
  local attempt rc state
  for ((attempt = 1; attempt <= MAX_ATTEMPTS; attempt++)); do
    if [[ "${DRY_RUN:-0}" != 1 ]]; then
      state=$(tpu_state)
      if [[ "$state" != READY ]]; then  # a spot TPU taken away: a new one, set up again
        echo "tpu_pod.sh: TPU $TPU_NAME is '${state:-gone}'; recreating it" >&2
        [[ -n "$state" ]] && delete
        create
        copy
        install
      fi
    fi
    rc=0
    on_all_workers "cd ~/$REMOTE_DIR && python3 -m jaxad.main --config=$CONFIG \
--workdir=$(remote_workdir) --distributed=auto $TRAIN_FLAGS" || rc=$?
    if [[ "${DRY_RUN:-0}" == 1 ]] || finished; then
      return 0
    fi
    if [[ "$rc" == 1 ]]; then  # jaxad's own error (bad config or input): rerunning won't help
      echo "tpu_pod.sh: the run failed (exit status 1); not retrying" >&2
      return 1
    fi
    echo "tpu_pod.sh: attempt $attempt/$MAX_ATTEMPTS ended (exit status $rc) without" \
      "results.json; rerunning the same command in ${RETRY_SECS}s (it resumes from the" \
      "last checkpoint)" >&2
    sleep "$RETRY_SECS"
  done
  echo "tpu_pod.sh: no results.json after $MAX_ATTEMPTS attempts" >&2
  return 1
}

fetch() {  # process 0 writes the run's JSON files; checkpoints stay in WORKDIR
  mkdir -p "$FETCH_DIR"
  if [[ "$WORKDIR" == gs://* ]]; then
    gcloud_cmd storage cp "$WORKDIR/config.json" "$WORKDIR/metrics.jsonl" \
      "$WORKDIR/results.json" "$FETCH_DIR/"
  else
    gcloud_cmd compute tpus tpu-vm scp "${GCLOUD_FLAGS[@]}" --worker=0 \
      "$TPU_NAME:$WORKDIR/config.json" "$TPU_NAME:$WORKDIR/metrics.jsonl" \
      "$TPU_NAME:$WORKDIR/results.json" "$FETCH_DIR/"
  fi
}

delete() {
  gcloud_cmd compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --quiet
}

all() {
  create
  if [[ "$KEEP_TPU" != 1 ]]; then
    trap delete EXIT
  fi
  copy
  install
  run
  fetch
}

case "${1:-}" in
  create|copy|install|run|fetch|delete|all) "$1" ;;
  *)
    echo "usage: $0 create|copy|install|run|fetch|delete|all (settings: see the header)" >&2
    exit 2 ;;
esac
