#!/usr/bin/env bash
# Run `mpickpt transform` with N MPI processes under MPICH's or Open MPI's mpiexec.
#
#   launch/mpirun.sh [-n N] [--hostfile FILE] [--mpiexec PATH] -- <mpickpt transform flags>
#
#   -n N              processes (default: the CPU count here); one per target rank is the natural choice
#   --hostfile FILE   hosts to run on (sources and dst_dir must then be on a shared filesystem)
#   --mpiexec PATH    the launcher (default: $MPIEXEC, else `mpiexec` on PATH, e.g. the venv's MPICH)
#   MPICKPT=PATH      the mpickpt command (default: `mpickpt` on PATH)
#
# The flavour is read from `mpiexec --version`. For Open MPI it adds --allow-run-as-root when run as root
# and --oversubscribe when N exceeds the local CPUs without a hostfile; mpickpt itself then tells mpi4py
# to use Open MPI's library (MPI4PY_MPIABI=openmpi) unless MPI4PY_MPIABI or MPI4PY_LIBMPI is set.
set -euo pipefail

np=$(nproc)
hostfile=""
mpiexec=${MPIEXEC:-mpiexec}
mpickpt=${MPICKPT:-mpickpt}
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    -n|-np|--np) np=$2; shift 2 ;;
    --hostfile|-f) hostfile=$2; shift 2 ;;
    --mpiexec) mpiexec=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "mpirun.sh: unknown option $1 (mpickpt flags go after --)" >&2; usage ;;
  esac
done
[ $# -gt 0 ] || { echo "mpirun.sh: no mpickpt transform flags after --" >&2; usage; }
case "$np" in ''|*[!0-9]*|0) echo "mpirun.sh: -n needs a positive number, got '$np'" >&2; exit 2 ;; esac

version=$("$mpiexec" --version 2>&1 || true)
args=(-n "$np")
if grep -qiE 'open ?mpi|open-rte|openrte' <<<"$version"; then
  [ "$(id -u)" != 0 ] || args+=(--allow-run-as-root)
  if [ -n "$hostfile" ]; then
    args+=(--hostfile "$hostfile")
  elif [ "$np" -gt "$(nproc)" ]; then
    args+=(--oversubscribe)
  fi
elif grep -qi 'hydra' <<<"$version"; then
  [ -z "$hostfile" ] || args+=(-f "$hostfile")
else
  echo "mpirun.sh: '$mpiexec --version' names neither MPICH (Hydra) nor Open MPI; passing -n only" >&2
  [ -z "$hostfile" ] || { echo "mpirun.sh: cannot pass --hostfile to an unknown launcher" >&2; exit 2; }
fi

exec "$mpiexec" "${args[@]}" "$mpickpt" transform "$@"
