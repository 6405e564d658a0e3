# shellcheck shell=bash
# The body shared by the FLUX fine-tuning launchers (finetune_flux_dreambooth*_deepspeed_bf16.sh).
# It is sourced, never run. The launcher sets, then calls `fk_main "$@"`:
#   FK_ROOT        the toolkit folder (trainers, patch_flux.py, make_tiny_flux.py, the config)
#   FK_KIND        full | lora
#   FK_NETWORK     the reference's network name, used in CASE_NAME.log (FluxDreambooth, FluxLora)
#   FK_TRAINER     our trainer script, relative to FK_ROOT
#   FK_DESCRIPTION one line for --help
#   FK_KEYS        the --key=value options particular to this launcher, in --help order
#                  (FK_COMMON_KEYS below are appended: every launcher has them)
#   FK_DEFAULT     associative array key -> default (the reference's values)
#   FK_DEMO        associative array key -> value under --demo (a key the user gives still wins)
#   FK_FIXED_ARGS  trainer flags always passed (the reference's fixed settings)
#   FK_DEMO_ARGS   trainer flags added under --demo, before the user's `--` arguments

# Keys every launcher has, with their defaults (a launcher's FK_DEFAULT may still override one).
FK_COMMON_KEYS=(config_file num_processes num_machines machine_rank main_process_ip main_process_port device train_script)
declare -A FK_COMMON_DEFAULT=(
    [config_file]="pretrain_bf16_accelerate_config.yaml"
    [num_processes]=""
    [num_machines]=1
    [machine_rank]=0
    [main_process_ip]=""
    [main_process_port]=""
    [device]=auto
    [train_script]=""
)

# Ascend settings the reference exports; only on NPU hosts, and a value already in the caller's
# environment wins.
FK_ASCEND_ENV=(
    "ASCEND_SLOG_PRINT_TO_STDOUT=0"                       # CANN logs to files, not the training log
    "ASCEND_GLOBAL_LOG_LEVEL=3"                           # errors only
    "ASCEND_GLOBAL_EVENT_ENABLE=0"
    "TASK_QUEUE_ENABLE=2"                                 # level-2 operator queue pipelining
    "COMBINED_ENABLE=1"                                   # fuse non-contiguous copy chains
    "HCCL_WHITELIST_DISABLE=1"
    "HCCL_CONNECT_TIMEOUT=1200"                           # seconds; many ranks start slowly
    "HCCL_EXEC_TIMEOUT=3600"                              # seconds; rank 0 writing a 12B checkpoint keeps the others waiting
    "ACLNN_CACHE_LIMIT=100000"                            # operator cache entries on the host
    "PYTORCH_NPU_ALLOC_CONF=expandable_segments:True"     # less fragmentation with gradient checkpointing
    "CPU_AFFINITY_CONF=1"                                 # bind each rank's threads near its NPU
)

fk_die() {
    printf '%s: error: %s\n' "$FK_PROG" "$*" >&2
    exit 2
}

fk_known_key() {
    local k
    for k in "${FK_KEYS[@]}"; do
        [[ "$k" == "$1" ]] && return 0
    done
    return 1
}

fk_key_help() {
    case "$1" in
        model_name) echo "FLUX pipeline folder or hub id" ;;
        dataset_name) echo "dataset folder/parquet or hub id ORG/NAME (image + caption columns); replaces instance_dir" ;;
        instance_dir) echo "folder of the subject's images; replaces dataset_name" ;;
        instance_prompt) echo "prompt naming the subject (the caption when the data has none)" ;;
        caption_column) echo "caption column of dataset_name (empty: instance_prompt for every image)" ;;
        validation_prompt) echo "prompt rendered at validation (empty: no validation)" ;;
        batch_size) echo "micro batch per device (--train_batch_size)" ;;
        max_train_steps) echo "optimizer steps" ;;
        mixed_precision) echo "bf16, fp16 or no; given to accelerate and the trainer" ;;
        resolution) echo "training resolution (a multiple of 16)" ;;
        gradient_accumulation_steps) echo "micro batches per optimizer step; given to accelerate/DeepSpeed and the trainer" ;;
        learning_rate)
            if [[ "$FK_KIND" == lora ]]; then
                echo "learning rate (the reference's 1e-6; LoRA usually wants about 1e-4)"
            else
                echo "learning rate (constant schedule, no warm-up)"
            fi ;;
        config_file) echo "accelerate config (DeepSpeed ZeRO-2 bf16); looked up here, then beside this launcher" ;;
        num_processes) echo "processes in total over all machines (default: devices per machine x num_machines)" ;;
        num_machines) echo "machines (env NNODES); run the launcher on each one" ;;
        machine_rank) echo "this machine's rank, 0 = main (env NODE_RANK)" ;;
        main_process_ip) echo "address of machine 0 (env MASTER_ADDR); needed with num_machines > 1" ;;
        main_process_port) echo "port on machine 0 (env MASTER_PORT; default: a free port, 29500 multi-node)" ;;
        output_dir) echo "weights, checkpoints, logs/train_*.log, logs/CASE_NAME.log, train_summary.json" ;;
        checkpointing_steps) echo "save a resumable checkpoint every N steps" ;;
        rank) echo "LoRA rank" ;;
        seed) echo "random seed" ;;
        device) echo "auto (npu > cuda > cpu), npu, cuda or cpu" ;;
        train_script) echo "another trainer, e.g. diffusers' upstream script, run through patch_flux.py (default: ours)" ;;
        *) echo "" ;;
    esac
}

fk_usage() {
    local k
    cat <<EOF
Usage: $FK_PROG [--key=value ...] [--dry_run] [--demo] [-- TRAINER_ARGS ...]

$FK_DESCRIPTION
Runs \`accelerate launch\` with DeepSpeed ZeRO-2 bf16 on Ascend NPUs, CUDA GPUs or CPUs (gloo),
one process per device found, on one or many machines.

Options, shown with their defaults (the reference's); override any as --key=value:
EOF
    for k in "${FK_KEYS[@]}"; do
        printf '  --%s=%s\n        %s\n' "$k" "${FK_DEFAULT[$k]:-}" "$(fk_key_help "$k")"
    done
    cat <<EOF

Modes:
  --dry_run      print the environment and the exact accelerate command, then exit
  --demo         build a tiny random FLUX and sample data into the demo cache (reused next time),
                 train a few dozen steps with DeepSpeed on whatever hardware is here (about a
                 minute on a CPU), generate images with the result and say where everything is
  -h, --help     this text

Arguments after -- go to the trainer verbatim, e.g. -- --lr_warmup_steps=100 --report_to=none
(except the flags the launcher hands to accelerate too: use its keys for those).

Environment:
  NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
                 multi-node, as --num_machines, --machine_rank, --main_process_ip,
                 --main_process_port (the keys win)
  PYTHON         interpreter with the toolkit's requirements (default: python3)
  FLUXKIT_DEMO_DIR
                 demo cache (default: \${XDG_CACHE_HOME:-\$HOME/.cache}/fluxkit/demo)
  OMP_NUM_THREADS, TOKENIZERS_PARALLELISM
                 set everywhere (1 per process on NPU/GPU, cores / processes on CPU; false)
  TORCH_ELASTIC_SHUTDOWN_TIMEOUT
                 seconds a signalled run may take to save its checkpoint before it is killed (600)
  On NPU only, each unless already set (the reference's Ascend settings):
$(printf '                 %s\n' "${FK_ASCEND_ENV[@]}")

SIGINT/SIGTERM to this launcher reach the trainer, which saves a checkpoint and exits 2 with the
command to resume.
Exit status: the trainer's; 2 for bad input (one line naming the culprit, before anything starts).
EOF
}

fk_parse_args() {
    local arg key
    while (($#)); do
        arg="$1"
        shift
        case "$arg" in
            --) FK_EXTRA=("$@"); return 0 ;;
            -h | --help) fk_usage; exit 0 ;;
            --dry_run) FK_DRY_RUN=1 ;;
            --demo) FK_DEMO_MODE=1 ;;
            --*=*)
                key="${arg%%=*}"
                key="${key#--}"
                fk_known_key "$key" || fk_die "unknown option --$key; known keys: ${FK_KEYS[*]} (and --dry_run, --demo, --help)"
                FK_OPT[$key]="${arg#*=}"
                FK_GIVEN[$key]=1
                ;;
            --*)
                key="${arg#--}"
                fk_known_key "$key" && fk_die "--$key needs a value: --$key=VALUE"
                fk_die "unknown option --$key; known keys: ${FK_KEYS[*]} (and --dry_run, --demo, --help)"
                ;;
            *) fk_die "unexpected argument '$arg': options are --key=value; trainer arguments go after --" ;;
        esac
    done
}

# A key the user did not give takes its value from an environment variable, when that is set.
fk_from_env() {
    local key="$1" var="$2"
    if [[ -z "${FK_GIVEN[$key]:-}" && -n "${!var:-}" ]]; then
        FK_OPT[$key]="${!var}"
        FK_GIVEN[$key]=1
    fi
}

fk_need_int() {  # key minimum
    local v="${FK_OPT[$1]}"
    [[ "$v" =~ ^[0-9]+$ ]] || fk_die "--$1='$v' is not a whole number; pass --$1=N"
    ((10#$v >= $2)) || fk_die "--$1=$v is too small; it must be at least $2"
}

fk_need_float() {
    local v="${FK_OPT[$1]}"
    [[ "$v" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || fk_die "--$1='$v' is not a number; pass e.g. --$1=1e-4"
}

fk_need_value() {
    [[ -n "${FK_OPT[$1]}" ]] || fk_die "--$1 is empty; pass --$1=VALUE"
}

fk_validate() {
    local k
    for k in batch_size max_train_steps resolution gradient_accumulation_steps checkpointing_steps num_machines rank; do
        fk_known_key "$k" && fk_need_int "$k" 1
    done
    fk_need_int seed 0
    fk_need_int machine_rank 0
    [[ -n "${FK_OPT[num_processes]}" ]] && fk_need_int num_processes 1
    [[ -n "${FK_OPT[main_process_port]}" ]] && fk_need_int main_process_port 1
    fk_need_float learning_rate
    case "${FK_OPT[mixed_precision]}" in
        bf16 | fp16 | no) ;;
        *) fk_die "--mixed_precision='${FK_OPT[mixed_precision]}' is not one of bf16, fp16, no" ;;
    esac
    case "${FK_OPT[device]}" in
        auto | npu | cuda | cpu) ;;
        *) fk_die "--device='${FK_OPT[device]}' is not one of auto, npu, cuda, cpu" ;;
    esac
    for k in model_name output_dir config_file instance_prompt; do
        fk_need_value "$k"
    done
    if ((10#${FK_OPT[machine_rank]} >= 10#${FK_OPT[num_machines]})); then
        fk_die "--machine_rank=${FK_OPT[machine_rank]} (NODE_RANK) must be below --num_machines=${FK_OPT[num_machines]} (NNODES)"
    fi
    if ((10#${FK_OPT[num_machines]} > 1)) && [[ -z "${FK_OPT[main_process_ip]}" ]]; then
        fk_die "--num_machines=${FK_OPT[num_machines]} needs machine 0's address: set MASTER_ADDR or --main_process_ip=HOST"
    fi
    if [[ -n "${FK_OPT[num_processes]}" ]] && ((10#${FK_OPT[num_processes]} % 10#${FK_OPT[num_machines]} != 0)); then
        fk_die "--num_processes=${FK_OPT[num_processes]} does not split evenly over --num_machines=${FK_OPT[num_machines]}"
    fi
    # Exactly one data source: the one the user named wins over the other's default.
    if [[ -n "${FK_OPT[dataset_name]}" && -n "${FK_OPT[instance_dir]}" ]]; then
        if [[ -n "${FK_GIVEN[dataset_name]:-}" && -n "${FK_GIVEN[instance_dir]:-}" ]]; then
            fk_die "--dataset_name and --instance_dir were both given; pass only one of them"
        elif [[ -n "${FK_GIVEN[instance_dir]:-}" ]]; then
            FK_OPT[dataset_name]=""
        else
            FK_OPT[instance_dir]=""
        fi
    fi
    if [[ -z "${FK_OPT[dataset_name]}" && -z "${FK_OPT[instance_dir]}" ]]; then
        fk_die "no training data: pass --instance_dir=PATH or --dataset_name=PATH"
    fi
}

# The config name is looked up in the caller's folder first, then beside the launcher.
fk_resolve_config() {
    local c="${FK_OPT[config_file]}"
    if [[ ! -e "$c" && "$c" != */* && -e "$FK_ROOT/$c" ]]; then
        c="$FK_ROOT/$c"
    fi
    FK_OPT[config_file]="$c"
}

fk_demo_setup() {
    local k
    FK_DEMO_CACHE="${FLUXKIT_DEMO_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fluxkit/demo}"
    for k in "${!FK_DEMO[@]}"; do
        if [[ -z "${FK_GIVEN[$k]:-}" ]]; then
            FK_OPT[$k]="${FK_DEMO[$k]//@CACHE@/$FK_DEMO_CACHE}"
        fi
    done
}

fk_demo_build() {
    local build=("$FK_PYTHON" "$FK_ROOT/make_tiny_flux.py" --preset tiny --seed 0 --overwrite)
    local todo=() line
    [[ -f "$FK_DEMO_CACHE/tiny_flux/model_index.json" ]] || todo+=(--output_dir "$FK_DEMO_CACHE/tiny_flux")
    [[ -f "$FK_DEMO_CACHE/data/prompts.txt" ]] || todo+=(--dataset_dir "$FK_DEMO_CACHE/data")
    if ((${#todo[@]} == 0)); then
        echo "demo: reusing the tiny FLUX and sample data in $FK_DEMO_CACHE"
        return 0
    fi
    if [[ -n "$FK_DRY_RUN" ]]; then
        echo "demo: would build the demo cache with:"
        line="$(printf '%q ' "${build[@]}" "${todo[@]}")"
        echo "  ${line% }"
        return 0
    fi
    echo "demo: building a tiny random FLUX and sample data in $FK_DEMO_CACHE (once)"
    mkdir -p "$FK_DEMO_CACHE"
    "${build[@]}" "${todo[@]}"
}

fk_preflight() {
    local check=("$FK_PYTHON" -m fluxkit.launch_check --prog "$FK_PROG" --device "${FK_OPT[device]}"
        --config_file "${FK_OPT[config_file]}" --batch_size "${FK_OPT[batch_size]}"
        --gradient_accumulation_steps "${FK_OPT[gradient_accumulation_steps]}"
        --mixed_precision "${FK_OPT[mixed_precision]}" --output_dir "${FK_OPT[output_dir]}"
        --model_name "${FK_OPT[model_name]}" --train_script "$FK_SCRIPT")
    [[ -n "${FK_OPT[dataset_name]}" ]] && check+=(--dataset_name "${FK_OPT[dataset_name]}")
    [[ -n "${FK_OPT[instance_dir]}" ]] && check+=(--instance_dir "${FK_OPT[instance_dir]}")
    [[ -z "${FK_OPT[main_process_port]}" && "${FK_OPT[num_machines]}" == 1 ]] && check+=(--need_port)
    [[ -n "$FK_DRY_RUN" ]] && check+=(--skip_paths)
    check+=(-- "${FK_EXTRA[@]}")
    local out line
    out="$("${check[@]}")" || exit "$?"
    while IFS= read -r line; do
        case "$line" in
            device_type=*) FK_DEVICE_TYPE="${line#*=}" ;;
            device_count=*) FK_DEVICE_COUNT="${line#*=}" ;;
            main_process_port=*) FK_OPT[main_process_port]="${line#*=}" ;;
        esac
    done <<<"$out"
    [[ -n "$FK_DEVICE_TYPE" ]] || fk_die "device detection printed nothing; run: $FK_PYTHON -m fluxkit.launch_check --help"
}

fk_processes() {
    local machines="$((10#${FK_OPT[num_machines]}))" per_machine="$FK_DEVICE_COUNT"
    if [[ -z "${FK_OPT[num_processes]}" ]]; then
        # the demo shows real multi-process DeepSpeed even on a CPU host
        if [[ -n "$FK_DEMO_MODE" && "$FK_DEVICE_TYPE" == cpu ]]; then
            per_machine=2
        fi
        FK_OPT[num_processes]="$((per_machine * machines))"
    fi
    FK_PROCS_PER_MACHINE="$((10#${FK_OPT[num_processes]} / machines))"
    [[ -n "${FK_OPT[main_process_port]}" ]] || FK_OPT[main_process_port]=29500
}

fk_setup_env() {
    local kv name threads
    FK_ENV_NAMES=(PYTHONPATH TOKENIZERS_PARALLELISM PYTHONUNBUFFERED OMP_NUM_THREADS TORCH_ELASTIC_SHUTDOWN_TIMEOUT)
    export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
    # seconds torchrun lets its workers finish after passing on a signal before it kills them
    # (torch's 30 would cut short a step plus the interrupt checkpoint of a 12B model)
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"
    # lines reach the log as they happen, not when a pipe buffer fills
    export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"
    if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
        threads=1  # the reference's choice next to an accelerator
        if [[ "$FK_DEVICE_TYPE" == cpu ]]; then
            threads="$(($(nproc) / FK_PROCS_PER_MACHINE))"
            ((threads >= 1)) || threads=1
        fi
        export OMP_NUM_THREADS="$threads"
    fi
    if [[ "$FK_DEVICE_TYPE" == npu ]]; then
        for kv in "${FK_ASCEND_ENV[@]}"; do
            name="${kv%%=*}"
            if [[ -z "${!name+set}" ]]; then
                export "${kv?}"
            else
                export "${name?}"
            fi
            FK_ENV_NAMES+=("$name")
        done
    fi
}

fk_build_command() {
    FK_CMD=("$FK_PYTHON" -m accelerate.commands.launch
        --config_file "${FK_OPT[config_file]}"
        --num_processes "${FK_OPT[num_processes]}"
        --num_machines "${FK_OPT[num_machines]}"
        --machine_rank "${FK_OPT[machine_rank]}"
        --main_process_port "${FK_OPT[main_process_port]}"
        --mixed_precision "${FK_OPT[mixed_precision]}"
        --gradient_accumulation_steps "${FK_OPT[gradient_accumulation_steps]}")
    if ((10#${FK_OPT[num_machines]} > 1)); then
        # every machine runs this launcher itself (torchrun style): no ssh/pdsh hostfile
        FK_CMD+=(--main_process_ip "${FK_OPT[main_process_ip]}" --deepspeed_multinode_launcher standard)
    fi
    if [[ -n "$FK_EXTERNAL" ]]; then
        FK_CMD+=("$FK_ROOT/patch_flux.py" "$FK_SCRIPT")
    else
        FK_CMD+=("$FK_SCRIPT")
    fi
    FK_CMD+=(--pretrained_model_name_or_path="${FK_OPT[model_name]}")
    if [[ -n "${FK_OPT[dataset_name]}" ]]; then
        FK_CMD+=(--dataset_name="${FK_OPT[dataset_name]}")
        if fk_known_key caption_column && [[ -n "${FK_OPT[caption_column]}" ]]; then
            FK_CMD+=(--caption_column="${FK_OPT[caption_column]}")
        fi
    else
        FK_CMD+=(--instance_data_dir="${FK_OPT[instance_dir]}")
    fi
    FK_CMD+=(--instance_prompt="${FK_OPT[instance_prompt]}"
        --resolution="${FK_OPT[resolution]}"
        --train_batch_size="${FK_OPT[batch_size]}"
        --gradient_accumulation_steps="${FK_OPT[gradient_accumulation_steps]}"
        --mixed_precision="${FK_OPT[mixed_precision]}"
        --learning_rate="${FK_OPT[learning_rate]}"
        --max_train_steps="${FK_OPT[max_train_steps]}"
        --checkpointing_steps="${FK_OPT[checkpointing_steps]}"
        --seed="${FK_OPT[seed]}"
        --output_dir="${FK_OPT[output_dir]}")
    fk_known_key rank && FK_CMD+=(--rank="${FK_OPT[rank]}")
    if fk_known_key validation_prompt && [[ -n "${FK_OPT[validation_prompt]}" ]]; then
        FK_CMD+=(--validation_prompt="${FK_OPT[validation_prompt]}")
    fi
    FK_CMD+=("${FK_FIXED_ARGS[@]}")
    # --device is ours; upstream scripts pick the device through accelerate
    [[ -n "$FK_EXTERNAL" ]] || FK_CMD+=(--device="$FK_DEVICE_TYPE")
    [[ -n "$FK_DEMO_MODE" ]] && FK_CMD+=("${FK_DEMO_ARGS[@]}")
    FK_CMD+=("${FK_EXTRA[@]}")
}

fk_print_plan() {
    local name line arg hide=""
    local shown=()
    # the plan is also teed into logs/train_*.log: never show a hub token given after --
    for arg in "${FK_CMD[@]}"; do
        if [[ -n "$hide" ]]; then
            shown+=("***"); hide=""
        elif [[ "$arg" == --hub_token=* ]]; then
            shown+=("--hub_token=***")
        else
            shown+=("$arg")
            [[ "$arg" == --hub_token ]] && hide=1
        fi
    done
    echo "device: $FK_DEVICE_TYPE x $FK_DEVICE_COUNT per machine; machines: ${FK_OPT[num_machines]} (this one: rank ${FK_OPT[machine_rank]}); processes: ${FK_OPT[num_processes]}"
    echo "global batch: ${FK_OPT[batch_size]} per device x ${FK_OPT[num_processes]} processes x ${FK_OPT[gradient_accumulation_steps]} accumulation = $((10#${FK_OPT[batch_size]} * 10#${FK_OPT[num_processes]} * 10#${FK_OPT[gradient_accumulation_steps]})) images per optimizer step"
    echo "environment:"
    for name in "${FK_ENV_NAMES[@]}"; do
        printf '  %s=%q\n' "$name" "${!name}"
    done
    line="$(printf '%q ' "${shown[@]}")"
    echo "command:"
    echo "  ${line% }"
}

fk_demo_infer() {
    local out="${FK_OPT[output_dir]}" images="${FK_OPT[output_dir]}/demo_images" infer
    local args=(--prompts_file "$FK_DEMO_CACHE/data/prompts.txt" --seeds 0 --num_inference_steps 4
        --height "${FK_OPT[resolution]}" --width "${FK_OPT[resolution]}" --output_dir "$images"
        --device "$FK_DEVICE_TYPE" --overwrite)
    if [[ "$FK_KIND" == lora ]]; then
        infer=("$FK_PYTHON" "$FK_ROOT/infer_flux_text2img_lora_bf16.py" --model_path "${FK_OPT[model_name]}" --lora_weights "$out")
    else
        infer=("$FK_PYTHON" "$FK_ROOT/infer_flux_text2img_dreambooth_bf16.py" --model_path "$out")
    fi
    echo "demo: generating images with the result"
    "${infer[@]}" "${args[@]}"
    echo "demo: done."
    if [[ "$FK_KIND" == lora ]]; then
        echo "  LoRA weights : $out/pytorch_lora_weights.safetensors (base model: ${FK_OPT[model_name]})"
    else
        echo "  weights      : $out (a complete FLUX pipeline folder)"
    fi
    echo "  images       : $images"
    echo "  training log : $FK_LOG"
}

fk_forward_signal() {
    FK_SIGNALLED="$1"
    # the run may have just ended: nothing left to tell
    kill -s "$1" -- "-$FK_RUN_PGID" 2>/dev/null || true
}

# Runs FK_CMD with its output teed into FK_LOG; sets FK_RC to the trainer's status. A SIGINT or
# SIGTERM sent to this launcher alone (`kill PID`, a batch scheduler) is passed on to the run's
# process group, so that the trainer saves its interrupt checkpoint; the launcher then waits for it.
# bash runs no trap while a foreground command runs, hence a background job and `wait`.
fk_run_training() {
    local tee_pid
    trap 'fk_forward_signal INT' INT
    trap 'fk_forward_signal TERM' TERM
    # job control gives the run a process group of its own; at a terminal, Ctrl-C then reaches
    # only this shell, which forwards it once. tee ignores both signals so that the trainer can
    # still print while it saves (a dead tee would break its stdout).
    set -m
    "${FK_CMD[@]}" 2>&1 </dev/null | (trap '' INT TERM && exec tee -a "$FK_LOG") &
    tee_pid="$!"
    FK_RUN_PGID="$(jobs -p %+)"
    set +m
    # wait returns early each time a trap runs; the run has ended when its leader is gone
    while :; do
        FK_RC=0
        wait "$FK_RUN_PGID" || FK_RC="$?"
        kill -0 "$FK_RUN_PGID" 2>/dev/null || break
    done
    wait "$tee_pid" || true
    trap - INT TERM
}

fk_main() {
    FK_PROG="$(basename "$0")"
    FK_PYTHON="${PYTHON:-python3}"
    # fluxkit is imported by the checks, the trainers and patch_flux wherever the caller stands
    export PYTHONPATH="$FK_ROOT${PYTHONPATH:+:$PYTHONPATH}"
    FK_SIGNALLED="" FK_DRY_RUN="" FK_DEMO_MODE="" FK_EXTERNAL="" FK_DEVICE_TYPE="" FK_DEVICE_COUNT="" FK_LOG=""
    FK_EXTRA=()
    declare -gA FK_OPT=() FK_GIVEN=()
    local k
    FK_KEYS+=("${FK_COMMON_KEYS[@]}")
    for k in "${FK_COMMON_KEYS[@]}"; do
        [[ -v "FK_DEFAULT[$k]" ]] || FK_DEFAULT["$k"]="${FK_COMMON_DEFAULT[$k]}"
    done
    for k in "${FK_KEYS[@]}"; do
        FK_OPT[$k]="${FK_DEFAULT[$k]:-}"
    done

    fk_parse_args "$@"
    fk_from_env num_machines NNODES
    fk_from_env machine_rank NODE_RANK
    fk_from_env main_process_ip MASTER_ADDR
    fk_from_env main_process_port MASTER_PORT
    [[ -n "$FK_DEMO_MODE" ]] && fk_demo_setup
    fk_validate
    fk_resolve_config
    command -v "$FK_PYTHON" >/dev/null || fk_die "'$FK_PYTHON' not found; activate the toolkit's environment or set PYTHON=/path/to/python"
    if [[ -n "${FK_OPT[train_script]}" ]]; then
        FK_EXTERNAL=1
        FK_SCRIPT="${FK_OPT[train_script]}"
        [[ -f "$FK_ROOT/patch_flux.py" ]] || fk_die "--train_script needs patch_flux.py beside the launcher ($FK_ROOT)"
    else
        FK_SCRIPT="$FK_ROOT/$FK_TRAINER"
    fi
    [[ -n "$FK_DEMO_MODE" ]] && fk_demo_build

    fk_preflight
    fk_processes
    fk_setup_env
    fk_build_command
    if [[ -n "$FK_DRY_RUN" ]]; then
        fk_print_plan
        exit 0
    fi

    local out="${FK_OPT[output_dir]}" start rc summary_args
    mkdir -p "$out/logs"
    FK_LOG="$out/logs/train_${FK_OPT[mixed_precision]}_${FK_NETWORK}_$(date +%Y%m%d_%H%M%S).log"
    start="$(date +%s)"
    fk_print_plan | tee "$FK_LOG"
    # our trainers write their own exit status here (accelerate reports 1 for any failure)
    export FLUXKIT_EXIT_STATUS_FILE="$out/logs/.trainer_exit_status"
    rm -f "$FLUXKIT_EXIT_STATUS_FILE"
    fk_run_training
    rc="$FK_RC"
    if ((rc != 0)) && [[ -s "$FLUXKIT_EXIT_STATUS_FILE" ]]; then
        read -r rc < "$FLUXKIT_EXIT_STATUS_FILE"
        ((rc != 0)) || rc=1  # the trainer ended well but another process did not
    fi
    if ((rc != 0)); then
        if [[ -n "$FK_SIGNALLED" ]]; then
            printf '%s: stopped on SIG%s (exit status %s); the trainer'"'"'s last lines in %s say how to resume\n' \
                "$FK_PROG" "$FK_SIGNALLED" "$rc" "$FK_LOG" >&2
        else
            printf '%s: error: training failed with exit status %s; see %s\n' "$FK_PROG" "$rc" "$FK_LOG" >&2
        fi
        exit "$rc"
    fi
    if ((10#${FK_OPT[machine_rank]} != 0)); then
        echo "machine ${FK_OPT[machine_rank]}: training finished; machine 0 reports the summary and holds the weights" | tee -a "$FK_LOG"
        exit 0
    fi
    summary_args=(--summary "$out/train_summary.json" --network "$FK_NETWORK" --log_dir "$out/logs"
        --batch_size "${FK_OPT[batch_size]}" --since "$start" --prog "$FK_PROG")
    [[ -n "$FK_EXTERNAL" ]] && summary_args+=(--allow_missing)
    set +e
    "$FK_PYTHON" -m fluxkit.run_summary "${summary_args[@]}" 2>&1 | tee -a "$FK_LOG"
    rc="${PIPESTATUS[0]}"
    set -e
    ((rc == 0)) || exit "$rc"
    echo "log: $FK_LOG"
    [[ -n "$FK_DEMO_MODE" ]] && fk_demo_infer
    return 0
}
