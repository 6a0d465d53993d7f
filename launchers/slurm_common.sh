# Shell functions shared by launchers/*.slurm. Source it; on its own it does nothing.
#
# What a job script gets from here:
#   sfd_init             find the repository and Python, check that this is a SLURM batch job
#   sfd_setup_network    MASTER_ADDR / MASTER_PORT from the allocation (unless already set)
#   sfd_setup_threads    OMP / NCCL environment defaults (every one overridable)
#   sfd_check_*          clear errors in the job log before anything is launched
#   sfd_step             the srun command of one launch (LAUNCHER: torchrun, deepspeed or srun)
#   sfd_run_preemptible  run a training step; on SIGUSR1 ask the ranks to checkpoint, then requeue
#   sfd_run_requeueing   run a resumable step (extraction, sampling); on SIGUSR1 requeue at once
# Every message starts with "[sfd-slurm]"; errors say which variable holds the wrong value.

sfd_log() { echo "[sfd-slurm $(date +%H:%M:%S)] $*"; }

sfd_die() {  # an error before launch: the job fails with this line in its log
  echo "[sfd-slurm] ERROR: $*" >&2
  exit 2
}

sfd_require() {  # sfd_require VAR "what it is": VAR must be set and not empty
  [ -n "${!1:-}" ] || sfd_die "$1 is not set: $2"
}

sfd_require_int() {  # sfd_require_int VAR MIN
  [[ "${!1:-}" =~ ^[0-9]+$ ]] && [ "${!1}" -ge "$2" ] \
    || sfd_die "$1=${!1:-<unset>} must be an integer >= $2"
}

sfd_one_of() {  # sfd_one_of VAR choice...
  local var=$1 choice
  shift
  for choice in "$@"; do [ "${!var:-}" = "$choice" ] && return 0; done
  sfd_die "$var=${!var:-<unset>} is not one of: $*"
}

# ------------------------------------------------------------------------------------------
# Repository, Python, job
# ------------------------------------------------------------------------------------------
sfd_init() {
  [ -n "${SLURM_JOB_ID:-}" ] || sfd_die "SLURM_JOB_ID is not set: submit this script with sbatch"
  sfd_require SLURM_JOB_NODELIST "the job's node list (set by sbatch)"
  sfd_require SLURM_JOB_NAME "the job name (sbatch --job-name); it names the run folder"
  sfd_require_int SLURM_JOB_NUM_NODES 1
  [ -f "$SFD_ROOT/launchers/train.py" ] \
    || sfd_die "SFD_ROOT=$SFD_ROOT is not the sfd-scale repository: submit from the repository root or set SFD_ROOT"
  cd "$SFD_ROOT" || sfd_die "cannot enter SFD_ROOT=$SFD_ROOT"
  if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=$SFD_ROOT/.venv/bin/python; else PYTHON=python3; fi
  fi
  command -v "$PYTHON" >/dev/null || sfd_die "PYTHON=$PYTHON is not an executable"
  "$PYTHON" -c "import sfd_scale" 2>/dev/null \
    || sfd_die "PYTHON=$PYTHON cannot import sfd_scale: run scripts/setup_env.sh or set PYTHON"
  NNODES=$SLURM_JOB_NUM_NODES
  export PYTHONUNBUFFERED=1  # log lines reach the job log as they happen
  sfd_log "job $SLURM_JOB_ID ($SLURM_JOB_NAME), restart ${SLURM_RESTART_COUNT:-0}, nodes $SLURM_JOB_NODELIST," \
          "batch host $(hostname), repository $SFD_ROOT, python $PYTHON"
}

# ------------------------------------------------------------------------------------------
# Devices and environment
# ------------------------------------------------------------------------------------------
sfd_gpus_on_node() {  # GPUs SLURM gave this node (0 when none)
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$CUDA_VISIBLE_DEVICES" != "NoDevFiles" ]; then
    echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU'
  else
    echo 0
  fi
}

sfd_check_processes() {  # NPROC_PER_NODE: default one per GPU; never more than the GPUs allocated
  if [ "${TEST_MODE:-}" = cpu ]; then
    : "${NPROC_PER_NODE:=1}"
    sfd_require_int NPROC_PER_NODE 1
    return
  fi
  local gpus
  gpus=$(sfd_gpus_on_node)
  [ "$gpus" -gt 0 ] || sfd_die "no GPU allocated on node ${SLURMD_NODENAME:-$(hostname)} (SLURM_GPUS_ON_NODE=${SLURM_GPUS_ON_NODE:-<unset>}," \
    "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-<unset>}): request GPUs (#SBATCH --gpus-per-node=8) or set TEST_MODE=cpu"
  : "${NPROC_PER_NODE:=$gpus}"
  sfd_require_int NPROC_PER_NODE 1
  [ "$NPROC_PER_NODE" -le "$gpus" ] || sfd_die "NPROC_PER_NODE=$NPROC_PER_NODE processes per node but only $gpus" \
    "GPU(s) are allocated on node ${SLURMD_NODENAME:-$(hostname)} (SLURM_GPUS_ON_NODE=${SLURM_GPUS_ON_NODE:-<unset>}); lower" \
    "NPROC_PER_NODE or ask for more GPUs (--gpus-per-node)"
}

sfd_setup_threads() {  # defaults only: anything already in the environment wins
  local cpus=${SLURM_CPUS_ON_NODE:-1}
  CPUS_PER_PROC=$(( cpus / NPROC_PER_NODE > 0 ? cpus / NPROC_PER_NODE : 1 ))
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS_PER_PROC}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # A rank that hits a NCCL error or timeout aborts instead of hanging the whole job.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  # DeepSpeed's JIT-built ops are cached once for every job of this repository.
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$SFD_ROOT/.cache/torch_extensions}
  if [[ "${TP:-1}" =~ ^[0-9]+$ ]] && [ "${TP:-1}" -gt 1 ]; then
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron-core overlap
  fi
  sfd_log "threads: OMP_NUM_THREADS=$OMP_NUM_THREADS; NCCL_DEBUG=$NCCL_DEBUG" \
          "NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-<nccl default>} NCCL_IB_HCA=${NCCL_IB_HCA:-<nccl default>}" \
          "GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-<gloo default>}"
}

# ------------------------------------------------------------------------------------------
# Rendezvous
# ------------------------------------------------------------------------------------------
sfd_setup_network() {  # MASTER_ADDR: the first node's address; MASTER_PORT: from the job id
  if [ -z "${MASTER_ADDR:-}" ]; then
    local first
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1)
    [ -n "$first" ] || sfd_die "cannot expand SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST with scontrol; set MASTER_ADDR"
    # The node's NodeAddr (what slurmd itself is reached at), else its name.
    MASTER_ADDR=$(scontrol show node "$first" -o 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
    MASTER_ADDR=${MASTER_ADDR:-$first}
  fi
  # The formula of sfd_scale.parallel.dims (srun without MASTER_PORT): the same on every node.
  export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}
  sfd_require_int MASTER_PORT 1
  sfd_log "rendezvous MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT ($NNODES node(s))"
}

sfd_probe_master() {  # on one node: is MASTER_ADDR:MASTER_PORT reachable and still free?
  local node=${SLURMD_NODENAME:-$(hostname)} out rc
  if ! getent ahosts "$MASTER_ADDR" >/dev/null 2>&1; then  # ahosts: an IP needs no reverse entry
    echo "MASTER_ADDR=$MASTER_ADDR does not resolve on node $node"
    return 1
  fi
  out=$(timeout "${MASTER_CHECK_TIMEOUT:-10}" bash -c "exec 3<>/dev/tcp/$MASTER_ADDR/$MASTER_PORT" 2>&1)
  rc=$?
  # Nothing listens before the launch, so "refused" is the healthy answer: the host replied.
  case "$rc:$out" in
    *"Connection refused"*) return 0 ;;
    0:*) echo "MASTER_PORT=$MASTER_PORT is already in use on MASTER_ADDR=$MASTER_ADDR (seen from node $node):" \
              "set MASTER_PORT to a free port" ;;
    124:*) echo "MASTER_ADDR=$MASTER_ADDR did not answer on port $MASTER_PORT within" \
                "${MASTER_CHECK_TIMEOUT:-10} s from node $node (firewall, or a wrong address?)" ;;
    *) echo "MASTER_ADDR=$MASTER_ADDR port $MASTER_PORT is unreachable from node $node: ${out##*: }" ;;
  esac
  return 1
}

sfd_check_master() {  # the probe above, on every node of the job
  local out
  out=$(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task=1 --kill-on-bad-exit=0 \
          bash -c "source '$SFD_ROOT/launchers/slurm_common.sh' && sfd_probe_master" 2>&1) \
    || sfd_die "rendezvous check failed: $(echo "$out" | grep -v '^srun:' | sort -u | paste -sd ';')"
}

# ------------------------------------------------------------------------------------------
# Launch
# ------------------------------------------------------------------------------------------
sfd_step() {  # sfd_step SCRIPT ARGS...: fill the array STEP with the srun command of the launch
  local script=$1 per_node_cpus=${SLURM_CPUS_ON_NODE:-1}
  shift
  # --ntasks too: srun would otherwise take the job's SLURM_NTASKS over --ntasks-per-node.
  local per_node=(--nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$per_node_cpus"
                  --kill-on-bad-exit=1)
  case "$LAUNCHER" in
    torchrun)  # one task per node; torchrun starts NPROC_PER_NODE ranks there
      STEP=(srun "${per_node[@]}"
            bash -c 'exec "$0" -m torch.distributed.run --node_rank="$SLURM_NODEID" "$@"' "$PYTHON"
            --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE"
            --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "$script" "$@") ;;
    deepspeed)  # one task per node; the deepspeed launcher without ssh, told its node rank
      local hostfile="$RUN_DIR/.hostfile-$SLURM_JOB_ID"
      scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$NPROC_PER_NODE/" > "$hostfile"
      STEP=(srun "${per_node[@]}"
            bash -c 'exec "$0" -m deepspeed.launcher.runner --node_rank="$SLURM_NODEID" "$@"' "$PYTHON"
            --hostfile="$hostfile" --no_ssh --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT"
            "$script" "$@") ;;
    srun)  # one task per rank; sfd_scale reads SLURM_PROCID / SLURM_LOCALID and MASTER_*
      STEP=(srun --nodes="$NNODES" --ntasks="$WORLD" --ntasks-per-node="$NPROC_PER_NODE"
            --cpus-per-task="$CPUS_PER_PROC" --kill-on-bad-exit=1 "$PYTHON" "$script" "$@") ;;
    *) sfd_die "LAUNCHER=$LAUNCHER is not one of: torchrun deepspeed srun" ;;
  esac
}

sfd_wait() {  # wait for pid $1 through any number of trapped signals; its exit status
  local rc=0
  while kill -0 "$1" 2>/dev/null; do
    wait "$1"
    rc=$?
  done
  return "$rc"
}

sfd_run_preemptible() {  # sfd_run_preemptible CMD...: the training step; sfd_train set the traps
  sfd_log "launch: ${*}"
  "$@" &
  local pid=$! rc
  sfd_wait "$pid"
  rc=$?
  trap - USR1 TERM
  if [ -f "$RUN_DIR/preempt.done" ]; then
    sfd_log "the ranks stopped on request: $(cat "$RUN_DIR/preempt.done")"
    if [ "$SFD_SIGNAL" = USR1 ] && [ "${REQUEUE:-1}" = 1 ]; then
      sfd_log "requeueing job $SLURM_JOB_ID; it resumes from the checkpoint just written"
      scontrol requeue "$SLURM_JOB_ID" || sfd_die "scontrol requeue $SLURM_JOB_ID failed"
    fi
    exit 0
  fi
  sfd_log "training step ended with exit status $rc"
  exit "$rc"
}

sfd_request_stop() {  # trap: ask every rank (through the shared run folder) to checkpoint and stop
  SFD_SIGNAL=$1
  sfd_log "got SIG$1: asking the ranks to checkpoint at the next step boundary"
  echo "SIG$1 $(date +%s)" > "$RUN_DIR/.preempt.request.tmp" \
    && mv -f "$RUN_DIR/.preempt.request.tmp" "$RUN_DIR/preempt.request"
}

sfd_run_requeueing() {  # sfd_run_requeueing CMD...: a step that a rerun resumes; SIGUSR1 requeues
  SFD_SIGNAL=""
  trap 'SFD_SIGNAL=USR1; sfd_log "got SIGUSR1: requeueing; the rerun keeps the finished parts"; \
        scontrol requeue "$SLURM_JOB_ID"' USR1
  sfd_log "launch: ${*}"
  "$@" &
  local pid=$! rc
  sfd_wait "$pid"
  rc=$?
  trap - USR1
  [ -z "$SFD_SIGNAL" ] || exit 0
  sfd_log "step ended with exit status $rc"
  exit "$rc"
}

# ------------------------------------------------------------------------------------------
# Jobs
# ------------------------------------------------------------------------------------------
# TEST_MODE=cpu runs a job on CPUs with gloo (no GPU is asked for or checked) with the CPU
# demo's own SFD settings (section `sfd` of configs/demo.yaml) in place of CONFIG: a tiny
# LightningDiT and the demo's encoders, for the demo's data (runs/demo after scripts/demo.sh)
# or any data of that shape. These settings make it quick; the variables still override them.
SFD_CPU_TEST_SETTINGS=(parallel.backend=gloo logging.progress_bar=false sample.num_steps=8)
SFD_CPU_TRAIN_SETTINGS=(train.device=cpu train.precision=fp32 train.global_batch_size=8
                        train.max_steps=20 train.log_every=1 train.ckpt_every=10)

sfd_job_setup() {  # sfd_job_setup LAUNCHER...: checks and environment shared by every job
  sfd_init
  sfd_one_of LAUNCHER "$@"
  RUN_ROOT=${RUN_ROOT:-runs}
  RUN_DIR=$RUN_ROOT/$SLURM_JOB_NAME
  mkdir -p "$RUN_DIR" || sfd_die "cannot create the run folder $RUN_DIR (RUN_ROOT=$RUN_ROOT)"
  if [ "${TEST_MODE:-}" = cpu ]; then
    sfd_cpu_test_config
  elif [ -n "${TEST_MODE:-}" ]; then
    sfd_die "TEST_MODE=$TEST_MODE is not one of: cpu (or empty)"
  fi
  [ -f "$CONFIG" ] || sfd_die "CONFIG=$CONFIG does not exist (paths are relative to $SFD_ROOT)"
  sfd_check_processes
  WORLD=$((NNODES * NPROC_PER_NODE))
  sfd_setup_threads
  sfd_setup_network
}

sfd_cpu_test_config() {  # CONFIG := the demo's SFD section, written into the run folder
  local out=$RUN_DIR/cpu_test_config.yaml
  "$PYTHON" -c 'import sys, yaml; yaml.safe_dump(yaml.safe_load(open(sys.argv[1]))["sfd"], open(sys.argv[2], "w"))' \
    configs/demo.yaml "$out.tmp" && mv -f "$out.tmp" "$out" \
    || sfd_die "TEST_MODE=cpu: cannot write $out from the sfd section of configs/demo.yaml"
  CONFIG=$out
  sfd_log "TEST_MODE=cpu: CONFIG=$CONFIG (configs/demo.yaml, section sfd)"
}

sfd_set_args() {  # sfd_set_args VAR:key ...: append "--set key=$VAR" to ARGS for every VAR that is set
  local pair var
  for pair in "$@"; do
    var=${pair%%:*}
    [ -n "${!var:-}" ] && ARGS+=(--set "${pair#*:}=${!var}")
  done
  return 0
}

sfd_extra_args() {  # EXTRA_ARGS, split on blanks, last: they override everything else
  local extra=()
  read -ra extra <<< "${EXTRA_ARGS:-}"
  ARGS+=("${extra[@]}")
}

sfd_preflight() {  # sfd_preflight SCRIPT ARGS...: SCRIPT checks the configuration for WORLD processes
  local out
  out=$("$PYTHON" "$@" --preflight-world-size "$WORLD" 2>&1) \
    || sfd_die "the configuration does not fit $WORLD process(es) ($NNODES node(s) x NPROC_PER_NODE=$NPROC_PER_NODE):" \
               "$(echo "$out" | tail -n 1)"
}

sfd_train() {  # a training job (xl.slurm, xxl.slurm), which set their defaults
  sfd_job_setup torchrun deepspeed srun
  sfd_one_of ENGINE ddp fsdp2 deepspeed
  sfd_one_of WANDB offline online disabled
  [ "${TEST_MODE:-}" = cpu ] && : "${DATA_DIR:=runs/demo/shards}"
  sfd_require DATA_DIR "the latent shard folder (launchers/extract.py output, or the published ImageNet latents)"
  [ -d "$DATA_DIR" ] || sfd_die "DATA_DIR=$DATA_DIR is not a folder"
  if [ -n "${TP:-}" ]; then
    sfd_require_int TP 1
    [ $((NPROC_PER_NODE % TP)) -eq 0 ] || sfd_die "TP=$TP tensor-parallel ranks must fit within a node," \
      "but NPROC_PER_NODE=$NPROC_PER_NODE is not a multiple of it"
  fi
  # From here on SIGUSR1 / SIGTERM ask for a checkpoint instead of killing the script; the
  # files of an earlier incarnation of this job must not stop this one.
  rm -f "$RUN_DIR/preempt.request" "$RUN_DIR/preempt.done"
  SFD_SIGNAL=""
  trap 'sfd_request_stop USR1' USR1
  trap 'sfd_request_stop TERM' TERM

  ARGS=(--config "$CONFIG" --preempt-check-every "${PREEMPT_CHECK_EVERY:-1}")
  if [ "${TEST_MODE:-}" = cpu ]; then
    for pair in "${SFD_CPU_TEST_SETTINGS[@]}" "${SFD_CPU_TRAIN_SETTINGS[@]}"; do ARGS+=(--set "$pair"); done
  fi
  ARGS+=(--set "train.output_dir=$RUN_ROOT" --set "train.exp_name=$SLURM_JOB_NAME" --set "data.data_dir=$DATA_DIR"
         --set "parallel.engine=$ENGINE" --set "logging.wandb=$WANDB")
  [ "$ENGINE" = deepspeed ] && sfd_set_args ZERO_STAGE:parallel.zero_stage
  sfd_set_args MODEL_SIZE:model.size MODEL_COMPILE:model.compile GLOBAL_BATCH:train.global_batch_size GRAD_ACCUM:parallel.grad_accum_steps \
               TP:parallel.tensor_parallel ACTIVATION_CHECKPOINTING:parallel.activation_checkpointing \
               MAX_STEPS:train.max_steps CKPT_EVERY:train.ckpt_every LOG_EVERY:train.log_every \
               SAMPLE_EVERY:train.sample_every VAE_CHECKPOINT:encoders.texture_vae_checkpoint \
               WANDB_PROJECT:logging.project
  sfd_extra_args
  sfd_preflight launchers/train.py "${ARGS[@]}"
  sfd_check_master
  sfd_log "run folder $RUN_DIR; $LAUNCHER launcher, engine $ENGINE, world $WORLD = $NNODES node(s) x $NPROC_PER_NODE," \
          "wandb $WANDB"
  sfd_step launchers/train.py "${ARGS[@]}"
  sfd_run_preemptible "${STEP[@]}"
}

sfd_extract() {  # an extraction job (extract.slurm)
  sfd_job_setup torchrun srun
  if [ "${TEST_MODE:-}" = cpu ]; then
    : "${IMAGES:=runs/demo/images}" "${IMAGE_SIZE:=32}"
  fi
  sfd_require IMAGES "the class-subfolder image root to encode"
  [ -d "$IMAGES" ] || sfd_die "IMAGES=$IMAGES is not a folder"
  sfd_require DATA_DIR "the folder the latent shards are written to"
  ARGS=(--config "$CONFIG" --images "$IMAGES")
  [ "${TEST_MODE:-}" = cpu ] && for pair in "${SFD_CPU_TEST_SETTINGS[@]}"; do ARGS+=(--set "$pair"); done
  ARGS+=(--set "data.data_dir=$DATA_DIR")
  [ -n "${IMAGE_SIZE:-}" ] && ARGS+=(--image-size "$IMAGE_SIZE")
  [ -n "${SHARD_SIZE:-}" ] && ARGS+=(--shard-size "$SHARD_SIZE")
  [ -n "${BATCH_SIZE:-}" ] && ARGS+=(--batch-size "$BATCH_SIZE")
  [ -n "${DECODER:-}" ] && ARGS+=(--decoder "$DECODER")
  sfd_set_args VAE_CHECKPOINT:encoders.texture_vae_checkpoint DINO_CHECKPOINT:encoders.dino_checkpoint \
               SEMVAE_CHECKPOINT:encoders.semvae_checkpoint
  sfd_extra_args
  sfd_check_master
  sfd_log "extracting $IMAGES -> $DATA_DIR; $LAUNCHER launcher, world $WORLD = $NNODES node(s) x $NPROC_PER_NODE"
  sfd_step launchers/extract.py "${ARGS[@]}"
  sfd_run_requeueing "${STEP[@]}"
}

sfd_sample() {  # a sampling job (sample.slurm)
  sfd_job_setup torchrun srun
  [ "${TEST_MODE:-}" = cpu ] && : "${NUM_IMAGES:=20}"
  sfd_require CHECKPOINT "the model to sample: a step folder of a run, a reference .pt or weights"
  [ -e "$CHECKPOINT" ] || sfd_die "CHECKPOINT=$CHECKPOINT does not exist"
  sfd_require DATA_DIR "the folder with latents_stats.pt and latents_sv_stats.pt of the training data"
  [ -d "$DATA_DIR" ] || sfd_die "DATA_DIR=$DATA_DIR is not a folder"
  OUT=${OUT:-$RUN_DIR}
  ARGS=(--config "$CONFIG" --checkpoint "$CHECKPOINT" --out "$OUT" --precision "${PRECISION:-fp32}")
  [ "${TEST_MODE:-}" = cpu ] && for pair in "${SFD_CPU_TEST_SETTINGS[@]}"; do ARGS+=(--set "$pair"); done
  ARGS+=(--set "data.data_dir=$DATA_DIR")
  [ -n "${NUM_IMAGES:-}" ] && ARGS+=(--num-images "$NUM_IMAGES")
  [ "${PNG:-0}" = 1 ] && ARGS+=(--png)
  sfd_set_args VAE_CHECKPOINT:encoders.texture_vae_checkpoint CFG_SCALE:sample.cfg_scale \
               AUTOGUIDANCE_CKPT:sample.autoguidance_ckpt AUTOGUIDANCE_CONFIG:sample.autoguidance_config
  sfd_extra_args
  sfd_check_master
  sfd_log "sampling $CHECKPOINT -> $OUT; $LAUNCHER launcher, world $WORLD = $NNODES node(s) x $NPROC_PER_NODE"
  sfd_step launchers/sample.py "${ARGS[@]}"
  sfd_run_requeueing "${STEP[@]}"
}
