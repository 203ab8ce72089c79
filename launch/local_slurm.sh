#!/usr/bin/env bash
# A one-node SLURM with accounting on this machine, for the tests and for trying `raf submit` without a cluster.
#
#   launch/local_slurm.sh start [DIR]    install (apt, when root and missing), configure and start the daemons
#   launch/local_slurm.sh stop [DIR]     stop every daemon this script started, by the PIDs it recorded
#   launch/local_slurm.sh status [DIR]   sinfo, or "down"
#
# DIR (default $RAF_SLURM_DIR or /tmp/rafmedia-slurm) holds the configuration, state, logs, the MariaDB data and
# env.sh; `source DIR/env.sh` points sbatch/squeue/sacct (and submitit) at this cluster. Nothing is written
# outside DIR except the packages apt installs. Daemons: munged (as the munge user), MariaDB on 127.0.0.1,
# slurmdbd, slurmctld, slurmd (as root), each with its PID file in DIR/run.
# A second cluster on the same machine (the tests start their own) needs other ports and node name:
#   RAF_SLURM_CTLD_PORT (6817), RAF_SLURM_D_PORT (6818), RAF_SLURM_DBD_PORT (6819), RAF_SLURM_DB_PORT (3307),
#   RAF_SLURM_NODE (the host name).
set -euo pipefail

COMMAND=${1:-start}
DIR=${2:-${RAF_SLURM_DIR:-/tmp/rafmedia-slurm}}
CLUSTER=rafmedia
DB_PORT=${RAF_SLURM_DB_PORT:-3307}
NODE=${RAF_SLURM_NODE:-$(hostname -s)}   # a second cluster on one machine needs its own node name (and ports)
DAEMONS=(slurmd slurmctld slurmdbd mariadb munged)   # stop order

say() { echo "local_slurm: $*" >&2; }

install_if_missing() {
    local missing=()
    for binary in slurmctld slurmd slurmdbd sacctmgr munged mariadbd mariadb-install-db; do
        command -v "$binary" >/dev/null 2>&1 || [ -x "/usr/sbin/$binary" ] || missing+=("$binary")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        say "missing ${missing[*]}; as root run: apt-get install -y slurm-wlm munge mariadb-server slurmdbd"
        exit 2
    fi
    say "installing slurm-wlm, munge, mariadb-server, slurmdbd (about a minute)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge mariadb-server slurmdbd >"$DIR/log/apt.log" 2>&1 \
        || { say "apt-get failed, see $DIR/log/apt.log"; exit 1; }
}

pidfile() { if [ "$1" = munged ]; then echo "$DIR/munge/munged.pid"; else echo "$DIR/run/$1.pid"; fi; }
pid_alive() { [ -s "$(pidfile "$1")" ] && kill -0 "$(cat "$(pidfile "$1")")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2; shift 2
    for _ in $(seq 1 $((seconds * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    say "timed out waiting for $what; logs in $DIR/log"; return 1
}

write_configs() {
    local host cpus memory
    host=$(hostname -s)
    cpus=$(nproc)
    cpus=$(( cpus < 4 ? 4 : cpus ))   # small machines: let tests run a few 1-CPU tasks side by side
    memory=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 8 / 10 ))
    cat >"$DIR/etc/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CryptoType=crypto/munge
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=${RAF_SLURM_CTLD_PORT:-6817}
SlurmdPort=${RAF_SLURM_D_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePass=$DIR/munge/munge.socket
AccountingStoragePort=${RAF_SLURM_DBD_PORT:-6819}
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=3600
SchedulerParameters=defer_batch=0
NodeName=$NODE NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=${RAF_SLURM_DBD_PORT:-6819}
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/etc/slurmdbd.conf"
    cat >"$DIR/env.sh" <<EOF
# source this file to point the SLURM commands (and submitit) at the local cluster in $DIR
export SLURM_CONF=$DIR/etc/slurm.conf
EOF
}

start_munge() {
    pid_alive munged && return 0
    if ! su -s /bin/sh munge -c "test -x '$DIR'"; then
        say "the munge user cannot reach $DIR (a parent folder is private); choose a DIR such as /tmp/rafmedia-slurm"
        exit 2
    fi
    mkdir -p "$DIR/munge"
    [ -f "$DIR/munge/munge.key" ] || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1 count=1024 status=none
    chown -R munge:munge "$DIR/munge"
    chmod 755 "$DIR/munge"   # the socket must be reachable by everyone; the key itself stays 600
    chmod 600 "$DIR/munge/munge.key"
    # munged runs as the munge user, so its files live in the munge-owned folder
    su -s /bin/sh munge -c "/usr/sbin/munged --key-file=$DIR/munge/munge.key --socket=$DIR/munge/munge.socket \
        --pid-file=$DIR/munge/munged.pid --log-file=$DIR/munge/munged.log --seed-file=$DIR/munge/munged.seed"
    wait_for 10 munged test -S "$DIR/munge/munge.socket"
}

start_mariadb() {
    pid_alive mariadb && return 0
    if [ ! -d "$DIR/db/mysql" ]; then
        mariadb-install-db --datadir="$DIR/db" --user=root --auth-root-authentication-method=normal \
            >"$DIR/log/mariadb-install.log" 2>&1
    fi
    (setsid mariadbd --datadir="$DIR/db" --user=root --bind-address=127.0.0.1 --port="$DB_PORT" \
        --socket="$DIR/run/mariadb.sock" --pid-file="$DIR/run/mariadb.pid" --log-error="$DIR/log/mariadb.log" \
        --skip-name-resolve >/dev/null 2>&1 &)
    wait_for 30 MariaDB mariadb --socket="$DIR/run/mariadb.sock" -uroot -e "select 1"
    mariadb --socket="$DIR/run/mariadb.sock" -uroot -e \
        "ALTER USER 'root'@'localhost' IDENTIFIED BY ''; CREATE USER IF NOT EXISTS 'root'@'127.0.0.1';
         GRANT ALL ON *.* TO 'root'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

start_slurm() {
    export SLURM_CONF=$DIR/etc/slurm.conf
    pid_alive slurmdbd || /usr/sbin/slurmdbd   # reads slurmdbd.conf next to $SLURM_CONF
    wait_for 30 slurmdbd sacctmgr -n list cluster
    sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
    pid_alive slurmctld || /usr/sbin/slurmctld -f "$DIR/etc/slurm.conf"
    wait_for 30 slurmctld scontrol ping
    pid_alive slurmd || /usr/sbin/slurmd -f "$DIR/etc/slurm.conf" -N "$NODE"
    wait_for 30 "the node to be idle" sh -c "sinfo -h -o %t | grep -q idle"
}

start() {
    mkdir -p "$DIR"/{etc,spool/ctld,spool/d,log,run,db}
    install_if_missing
    write_configs
    start_munge
    start_mariadb
    start_slurm
    say "up: $(SLURM_CONF=$DIR/etc/slurm.conf sinfo -h -o '%P %D node(s) %c CPUs %t') (source $DIR/env.sh)"
}

# Step daemons of this cluster's jobs (slurmstepd works in $DIR/log) and everything under them.
descendants() {
    local child
    for child in $(pgrep -P "$1" || true); do echo "$child"; descendants "$child"; done
}

job_processes() {
    local pid cwd
    for pid in $(pgrep -x slurmstepd || true); do
        cwd=$(readlink "/proc/$pid/cwd" 2>/dev/null || true)
        case "$cwd" in "$DIR"/*) echo "$pid"; descendants "$pid" ;; esac
    done
}

stop() {
    if pid_alive slurmctld; then  # end the jobs first, so that no job outlives its cluster
        SLURM_CONF=$DIR/etc/slurm.conf scancel --full --quiet $(SLURM_CONF=$DIR/etc/slurm.conf squeue -h -o %i) 2>/dev/null || true
        for _ in $(seq 1 100); do [ -z "$(SLURM_CONF=$DIR/etc/slurm.conf squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
    for daemon in "${DAEMONS[@]}"; do
        if pid_alive "$daemon"; then
            kill "$(cat "$(pidfile "$daemon")")"
            for _ in $(seq 1 100); do pid_alive "$daemon" || break; sleep 0.1; done
            if pid_alive "$daemon"; then kill -9 "$(cat "$(pidfile "$daemon")")"; fi
        fi
        rm -f "$(pidfile "$daemon")"
    done
    local left
    left=$(job_processes)
    if [ -n "$left" ]; then kill -9 $left 2>/dev/null || true; fi
    say "stopped the daemons started in $DIR"
}

case "$COMMAND" in
    start) start ;;
    stop) stop ;;
    status) if pid_alive slurmctld; then SLURM_CONF=$DIR/etc/slurm.conf sinfo; else echo down; exit 3; fi ;;
    *) echo "usage: $0 start|stop|status [DIR]" >&2; exit 2 ;;
esac
