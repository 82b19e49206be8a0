"""How many workers threadward starts, and which GPUs they get.

Each worker is a Python process that stays alive across tasks, so what a
task's variables load (a model, a dataset) can be kept for the next task.
"""

# Number of worker processes (default 1).
NUM_WORKERS = 2

# GPUs per worker (default 0: CPU only, the worker sees no GPU).
#   1, 2, ...        each worker gets that many GPUs of its own
#   0.5, 1/3, 0.25   1/k: k workers share one GPU (they also share its memory!)
# Each worker sees only its own GPUs through CUDA_VISIBLE_DEVICES.
NUM_GPUS_PER_WORKER = 0

# GPU numbers as nvidia-smi shows them, e.g. ["0", "3"] (ints work too).
# AVOID_GPUS: never use these.  INCLUDE_GPUS: use only these.  GPUs that are
# allowed but not needed at the start are kept in reserve for the `add` command.
AVOID_GPUS = None
INCLUDE_GPUS = None

# Each worker's share of the CPU: its OMP_NUM_THREADS, MKL_NUM_THREADS and
# the like (PyTorch, numpy and scikit-learn follow them).  None: the cores
# this process may use / the workers (at least 1); a variable you set in the
# environment yourself is kept.  PIN_CPUS = True also pins each worker to
# CPUS_PER_WORKER cores of its own (LAUNCHER = "local" only).
CPUS_PER_WORKER = None
PIN_CPUS = False

# How workers are started (default "local": processes on this machine).
#   "slurm"   each worker is one Slurm job step: srun --nodes=1 --ntasks=1
#             (--exact inside an allocation) --gpus=NUM_GPUS_PER_WORKER;
#             Slurm chooses the GPUs.  SLURM_OPTIONS are added to every srun,
#             e.g. ["--partition=gpu", "--time=2:00:00", "--immediate=60"].
#   "ssh"     workers on the HOSTS, e.g. ["node1", "node2:4"] ("host:N": N
#             workers there; a host alone gets NUM_WORKERS).  SSH_OPTIONS are
#             added to every ssh; the project must be at the same path there
#             (a shared filesystem), and REMOTE_PYTHON names the interpreter
#             if it is not at the same path as here.
#   ["any", "command", "{worker_id}", "{gpus}"]   a prefix put before the
#             worker's command (kubectl exec, a container runtime, ...).
LAUNCHER = "local"
SLURM_OPTIONS = []
HOSTS = []
SSH_OPTIONS = []
REMOTE_PYTHON = None
