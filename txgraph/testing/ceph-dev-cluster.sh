#!/usr/bin/env bash
# ceph-dev-cluster.sh - a throwaway single-node Ceph cluster for txgraph tests.
#
#   ceph-dev-cluster.sh up DIR            create (or reuse) a cluster in DIR and print
#                                         `export NAME='value'` lines on stdout
#   ceph-dev-cluster.sh down DIR          unmap/unmount everything of the cluster, stop
#                                         it and remove DIR (idempotent)
#   ceph-dev-cluster.sh status DIR        exit 0 if the cluster in DIR is healthy
#   ceph-dev-cluster.sh map DIR IMAGE     expose pool image IMAGE as a block device
#                                         (rbd-fuse + losetup); prints /dev/loopN
#   ceph-dev-cluster.sh unmap DIR IMAGE   undo `map` (unmounts filesystems on the loop)
#
# One ceph-mon and one ceph-osd on 127.0.0.1, no ceph-mgr, cephx on.  Every file the
# cluster uses (config, keyrings, mon/osd data, run dir, admin sockets, pid files, logs,
# crash dir, FUSE mount points) lives in DIR.  The object store is memstore (RAM only)
# unless CEPH_DEV_STORE=bluestore, which puts bluestore on a sparse file in DIR.
#
# Exported by `up`: CEPH_CONF CEPH_KEYRING CEPH_POOL CEPH_MON_HOST CEPH_DEV_DIR CEPH_FSID,
# plus CEPH_TXGRAPH_ID / CEPH_TXGRAPH_KEYRING for the restricted client `client.txgraph`
# (caps: mon 'profile rbd', osd 'profile rbd pool=rbd').
#
# Environment: CEPH_DEV_STORE=memstore|bluestore; CEPH_DEV_MON_PORT=P tries mon ports P,P+1
# first (then random free ones in 20000-29999 if P cannot be bound); CEPH_DEV_MEMSTORE_BYTES=N
# sizes the memstore (default 4 GiB; the thin benchmark's large images need more).
#
# Exit status: 0 on success; otherwise non-zero with one line on stderr naming what failed.
# Needs root for map/unmap/down of mappings (FUSE, losetup, mount).  Never uses pkill or
# killall: it only signals PIDs read from DIR or found in /proc with DIR in their cmdline.
set -euo pipefail

PROG=ceph-dev-cluster
POOL=rbd
MON_ID=a
OSD_ID=0
# Hard limits (seconds) around anything that talks to the cluster.  Nothing here needs
# ceph-mgr, but a mgr-only command would hang forever without one.
T_CLI=${CEPH_DEV_CLI_TIMEOUT:-60}
T_PROBE=${CEPH_DEV_PROBE_TIMEOUT:-15}
MEMSTORE_BYTES=${CEPH_DEV_MEMSTORE_BYTES:-$((4 << 30))}
BLUESTORE_BYTES=$((10 << 30))

die() { echo "$PROG: $*" >&2; exit 1; }
usage() { die "usage: $0 {up|down|status} DIR | {map|unmap} DIR IMAGE"; }

# --------------------------------------------------------------------------- helpers

# canonical absolute DIR (it may not exist yet); refuse characters that would break
# ceph.conf, the shell-quoted export lines, or /proc cmdline matching.
canon_dir() {
    local d
    [ -n "$1" ] || die "DIR must not be empty"
    d=$(realpath -m -- "$1") || die "cannot resolve DIR '$1'"
    [[ $d =~ ^/[A-Za-z0-9._/@+,=:-]*$ ]] \
        || die "DIR '$d' contains characters not allowed here (use [A-Za-z0-9._/@+,=:-])"
    [ "$d" != / ] || die "refusing to use / as DIR"
    # AF_UNIX paths are limited to 107 bytes; the longest admin socket is run/ceph-osd.N.asok
    [ $(( ${#d} + 19 )) -le 107 ] || die "DIR '$d' is too long for admin sockets (max 88 chars)"
    printf '%s\n' "$d"
}

# `up` writes this marker before anything else; `down` only deletes marked directories
is_ours() { [ -f "$DIR/.ceph-dev-cluster" ]; }

# take an exclusive lock on DIR itself (serialises up/down/map/unmap on one DIR).
# fd 9 must not leak into long-lived children: they are started with 9>&-.
lock_dir() {
    local i
    for i in 1 2 3 4 5; do
        [ -d "$DIR" ] || return 1
        exec 9<"$DIR" || return 1
        flock 9 || die "flock on $DIR failed"
        # DIR may have been removed (and re-made) while we waited
        if [ -d "$DIR" ] && [ "$(stat -L -c %d:%i /proc/$$/fd/9)" = "$(stat -c %d:%i "$DIR")" ]; then
            return 0
        fi
        exec 9<&-
    done
    die "DIR $DIR keeps changing under the lock"
}

# process state letter from /proc/PID/stat ('' if gone)
pstate() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    s=${s##*) }
    printf '%s' "${s%% *}"
}

# alive = exists and is neither a zombie nor dead (kill -0 succeeds on zombies)
alive() {
    local s
    [[ ${1:-} =~ ^[0-9]+$ ]] || return 1
    s=$(pstate "$1")
    [ -n "$s" ] && [ "$s" != Z ] && [ "$s" != X ] && [ "$s" != x ]
}

# does PID's cmdline reference DIR (an argument equal to or under DIR, or --opt=DIR/...)?
refs_dir() {
    local a
    local -a args=()
    mapfile -d '' args 2>/dev/null <"/proc/$1/cmdline" || return 1
    for a in "${args[@]}"; do
        if [ "$a" = "$DIR" ] || [[ $a == "$DIR"/* ]]; then return 0; fi
        a=${a#*=}
        if [ "$a" = "$DIR" ] || [[ $a == "$DIR"/* ]]; then return 0; fi
    done
    return 1
}

# PIDs of live processes named $1 (ceph-mon, ceph-osd, rbd-fuse) referencing DIR
scan_pids() {
    local p comm
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [ "$p" != $$ ] || continue
        read -r comm 2>/dev/null <"/proc/$p/comm" || continue
        [ "$comm" = "$1" ] || continue
        alive "$p" || continue
        refs_dir "$p" && echo "$p"
    done
    return 0
}

# PID from a pid file in DIR, only if it is alive, has the expected name and references DIR
pid_from_file() {
    local f=$1 name=$2 p comm
    [ -f "$f" ] || return 0
    read -r p 2>/dev/null <"$f" || return 0
    p=${p//[[:space:]]/}
    alive "$p" || return 0
    read -r comm 2>/dev/null <"/proc/$p/comm" || return 0
    [ "$comm" = "$name" ] || return 0
    refs_dir "$p" && echo "$p"
    return 0
}

daemon_pids() {  # $1 = ceph-mon | ceph-osd
    local f
    case $1 in
        ceph-mon) f=$DIR/run/mon.$MON_ID.pid ;;
        ceph-osd) f=$DIR/run/osd.$OSD_ID.pid ;;
    esac
    { pid_from_file "$f" "$1"; scan_pids "$1"; } | sort -u
}

# SIGTERM, wait up to $1 s, SIGKILL, wait up to 5 s more; args after $1 are PIDs
stop_pids() {
    local grace=$1 p i left
    shift
    [ $# -gt 0 ] || return 0
    for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
    for ((i = 0; i < grace * 50; i++)); do
        left=0
        for p in "$@"; do alive "$p" && left=1; done
        [ $left = 0 ] && return 0
        sleep 0.02
    done
    for p in "$@"; do alive "$p" && kill -KILL "$p" 2>/dev/null || true; done
    for ((i = 0; i < 250; i++)); do
        left=0
        for p in "$@"; do alive "$p" && left=1; done
        [ $left = 0 ] && return 0
        sleep 0.02
    done
    return 1
}

# unescape the octal escapes of /proc/self/mountinfo (\040 etc.)
unescape() { printf '%b' "${1//\\/\\0}"; }

# is $1 a mount point?  (read from mountinfo: mountpoint(1) fails on a dead FUSE mount)
is_mounted() {
    local line
    local -a f
    while IFS= read -r line; do
        read -ra f <<<"$line"
        [ "$(unescape "${f[4]}")" = "$1" ] && return 0
    done </proc/self/mountinfo
    return 1
}

# mount points of the filesystems on block device $1 (matched by major:minor)
mounts_of_dev() {
    local line majmin
    local -a f
    read -r majmin 2>/dev/null <"/sys/class/block/${1#/dev/}/dev" || return 0
    while IFS= read -r line; do
        read -ra f <<<"$line"
        if [ "${f[2]}" = "$majmin" ]; then unescape "${f[4]}"; echo; fi
    done </proc/self/mountinfo
    return 0
}

# mount points at or under path $1 (one per line, in mount order)
mounts_under() {
    local line mp
    local -a f
    while IFS= read -r line; do
        read -ra f <<<"$line"
        mp=$(unescape "${f[4]}")
        if [ "$mp" = "$1" ] || [[ $mp == "$1"/* ]]; then echo "$mp"; fi
    done </proc/self/mountinfo
    return 0
}

# FUSE mount points at or under $1 (one per line)
fuse_mounts_under() {
    local line mp fstype
    local -a f
    while IFS= read -r line; do
        read -ra f <<<"$line"
        mp=$(unescape "${f[4]}")
        fstype=${line#* - }
        fstype=${fstype%% *}
        [[ $fstype == fuse* ]] || continue
        if [ "$mp" = "$1" ] || [[ $mp == "$1"/* ]]; then echo "$mp"; fi
    done </proc/self/mountinfo
    return 0
}

# the mount point an rbd-fuse process was given (its last non-option argument)
rbdfuse_mountpoint() {
    local a skip=0 mp='' cwd
    local -a args=()
    mapfile -d '' args 2>/dev/null <"/proc/$1/cmdline" || return 0
    for a in "${args[@]:1}"; do
        if [ $skip = 1 ]; then skip=0; continue; fi
        case $a in
            -c | --configfile | --conf | -p | --poolname | -r | --image | -o | \
                --id | -i | -n | --name | -k | --keyring | --cluster) skip=1 ;;
            -*) ;;
            *) mp=$a ;;
        esac
    done
    [ -n "$mp" ] || return 0
    if [[ $mp != /* ]]; then
        cwd=$(readlink "/proc/$1/cwd" 2>/dev/null) || return 0
        mp=$cwd/$mp
    fi
    realpath -m -- "$mp"
}

# loop devices (/dev/loopN) whose backing file is at or under path $1
loops_backed_under() {
    local b f
    for b in /sys/block/loop*/loop/backing_file; do
        [ -r "$b" ] || continue
        read -r f 2>/dev/null <"$b" || continue
        f=${f% (deleted)}
        if [ "$f" = "$1" ] || [[ $f == "$1"/* ]]; then
            b=${b#/sys/block/}
            echo "/dev/${b%%/*}"
        fi
    done
    return 0
}

# umount a mount point; retries EBUSY for a moment, then detaches lazily
umount_hard() {
    local mp=$1 i
    for ((i = 0; i < 25; i++)); do
        is_mounted "$mp" || return 0
        timeout 20 umount -- "$mp" 2>/dev/null && return 0
        sleep 0.04
    done
    timeout 20 umount -l -- "$mp" 2>/dev/null && return 0
    ! is_mounted "$mp"
}

# unmount every filesystem on loop device $1 (and what is mounted below them), detach it
release_loop() {
    local dev=$1 mp sub
    local -a mps subs
    mapfile -t mps < <(mounts_of_dev "$dev")
    for mp in "${mps[@]}"; do
        [ -n "$mp" ] || continue
        mapfile -t subs < <(mounts_under "$mp" | tac)
        for sub in "${subs[@]}"; do
            umount_hard "$sub" || die "cannot unmount $sub (on $dev)"
        done
    done
    # Right after a umount the kernel may still hold the device for a moment,
    # and losetup -d on a busy device only sets autoclear and returns 0: wait
    # until the device is really detached, or rbd-fuse would be stopped while
    # the loop still holds its file (and its watch would outlive it for 30 s).
    local i err='' sys=/sys/class/block/${dev#/dev/}/loop
    for ((i = 0; i < 250; i++)); do
        [ -e "$sys/backing_file" ] || return 0
        if [ "$(cat "$sys/autoclear" 2>/dev/null)" != 1 ]; then
            err=$(losetup -d "$dev" 2>&1) || true
        fi
        sleep 0.02
    done
    die "cannot detach loop device $dev: ${err##*$'\n'}"
}

# last non-empty line of file $1 (for one-line error messages)
lastline() { grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n1 || true; }

# conf-aware client commands, always under a hard timeout
ceph_cli() {
    local t=$1
    shift
    timeout -k 5 "$t" ceph --conf "$DIR/ceph.conf" --connect-timeout "$t" "$@"
}
rados_cli() {
    local t=$1
    shift
    timeout -k 5 "$t" rados --conf "$DIR/ceph.conf" --client_mount_timeout "$t" "$@"
}
rbd_cli() {
    local t=$1
    shift
    timeout -k 5 "$t" rbd --conf "$DIR/ceph.conf" --client_mount_timeout "$t" "$@"
}

probe_write() {
    rados_cli "$1" -p "$POOL" --rados_osd_op_timeout "$1" put txgraph-dev-probe "$DIR/fsid" \
        >/dev/null 2>&1
}

healthy() {
    [ -f "$DIR/ceph.conf" ] && [ -f "$DIR/env" ] || return 1
    [ -n "$(pid_from_file "$DIR/run/mon.$MON_ID.pid" ceph-mon)" ] || return 1
    [ -n "$(pid_from_file "$DIR/run/osd.$OSD_ID.pid" ceph-osd)" ] || return 1
    probe_write "$T_PROBE"
}

# ----------------------------------------------------------------------------- down

teardown() {  # stop everything of the cluster in DIR; leaves DIR itself in place
    local mon osd p mp dev
    local -a fuse_pids=() fuse_mps=() loops=() mps=()

    mon=$(daemon_pids ceph-mon)
    osd=$(daemon_pids ceph-osd)
    mapfile -t fuse_pids < <(scan_pids rbd-fuse)

    # rbd-fuse mounts: those under DIR, and those of any rbd-fuse started with DIR's conf
    mapfile -t fuse_mps < <(
        fuse_mounts_under "$DIR"
        for p in "${fuse_pids[@]}"; do
            mp=$(rbdfuse_mountpoint "$p")
            [ -n "$mp" ] && echo "$mp"
        done | sort -u
    )

    # A dead daemon means FUSE writes can never complete: kill rbd-fuse first, so that
    # unmounting the filesystems above it fails their I/O instead of blocking forever.
    if [ -z "$mon" ] || [ -z "$osd" ]; then
        for p in "${fuse_pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    fi

    mapfile -t loops < <(
        for mp in "${fuse_mps[@]}" "$DIR"; do
            [ -n "$mp" ] && loops_backed_under "$mp"
        done | sort -u
    )
    for dev in "${loops[@]}"; do
        release_loop "$dev"
    done
    for mp in "${fuse_mps[@]}"; do
        [ -n "$mp" ] || continue
        umount_hard "$mp" || die "cannot unmount rbd-fuse mount $mp"
    done
    # anything else still mounted below DIR (innermost first)
    mapfile -t mps < <(mounts_under "$DIR" | tac)
    for mp in "${mps[@]}"; do
        umount_hard "$mp" || die "cannot unmount $mp"
    done
    # rbd-fuse exits once unmounted; stragglers get signalled
    mapfile -t fuse_pids < <(scan_pids rbd-fuse)
    stop_pids 5 "${fuse_pids[@]}" || die "rbd-fuse (pids ${fuse_pids[*]}) did not exit"

    # the OSD waits for the mon to ack its shutdown: stop it first
    # shellcheck disable=SC2086
    stop_pids 5 $osd || die "ceph-osd (pid $osd) did not exit"
    # shellcheck disable=SC2086
    stop_pids 5 $mon || die "ceph-mon (pid $mon) did not exit"
    return 0
}

cmd_down() {
    [ -e "$DIR" ] || [ -L "$DIR" ] || return 0
    [ -d "$DIR" ] || die "down: $DIR is not a directory"
    lock_dir || return 0
    if ! is_ours && [ -n "$(ls -A "$DIR")" ]; then
        die "down: $DIR is not a ceph-dev-cluster directory (no .ceph-dev-cluster marker); not removing it"
    fi
    teardown
    rm -rf -- "$DIR" || die "down: cannot remove $DIR"
}

# ------------------------------------------------------------------------------- up

free_port_pair() {  # is neither $1 nor $1+1 a listening TCP port?
    local hex1 hex2
    hex1=$(printf ':%04X ' "$1")
    hex2=$(printf ':%04X ' $(($1 + 1)))
    ! grep -qE "^ *[0-9]+: [0-9A-F]+($hex1|$hex2)" /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

write_conf() {  # $1 = mon port, $2 = fsid, $3 = store
    local port=$1 fsid=$2 store=$3
    cat >"$DIR/ceph.conf.tmp" <<EOF
# written by $PROG for a throwaway test cluster; everything lives in $DIR
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$port,v1:127.0.0.1:$((port + 1))]
mon initial members = $MON_ID
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = $DIR/run
crash dir = $DIR/crash
mon cluster log file = $DIR/log/\$cluster.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# no ceph-mgr: keep MGR_DOWN out of health for 10 years
mon mgr mkfs grace = 315360000
# monitor writes (pool/snapshot create) take up to 1 s with the default paxos timing
paxos propose interval = 0.01
paxos min wait = 0.001
mon data avail warn = 2
mon data avail crit = 1
osd mon shutdown timeout = 2

[mon]
mon data = $DIR/mon/\$cluster-\$id
keyring = $DIR/mon/\$cluster-\$id/keyring
pid file = $DIR/run/\$type.\$id.pid
admin socket = $DIR/run/\$cluster-\$name.asok
log file = $DIR/log/\$cluster-\$name.log
# a taken port makes ceph-mon exit at once instead of retrying 3 x 5 s
ms bind retry count = 1

[osd]
osd data = $DIR/osd/\$cluster-\$id
keyring = $DIR/osd/\$cluster-\$id/keyring
pid file = $DIR/run/\$type.\$id.pid
admin socket = $DIR/run/\$cluster-\$name.asok
log file = $DIR/log/\$cluster-\$name.log
osd objectstore = $store
EOF
    if [ "$store" = memstore ]; then
        cat >>"$DIR/ceph.conf.tmp" <<EOF
memstore device bytes = $MEMSTORE_BYTES
EOF
    else
        cat >>"$DIR/ceph.conf.tmp" <<EOF
bluestore block create = true
bluestore block size = $BLUESTORE_BYTES
bluestore fsck on mkfs = false
# a file counts as rotational: 5 shards, each opening the file with a 250 ms close
bdev aio poll ms = 20
osd op num shards = 1
osd op num threads per shard = 2
osd memory target = 1073741824
EOF
    fi
    cat >>"$DIR/ceph.conf.tmp" <<EOF

[client]
keyring = $DIR/ceph.client.admin.keyring
log file = $DIR/log/\$cluster-\$name.log
EOF
    mv -f "$DIR/ceph.conf.tmp" "$DIR/ceph.conf"
}

# keyrings: mon., client.admin, client.txgraph and osd.N all go into the mon keyring, so
# `ceph-mon --mkfs` puts them in the auth database and no auth commands are needed later
make_keyrings() {
    local k=$DIR/mon.keyring osdk=$DIR/osd/ceph-$OSD_ID/keyring
    {
        ceph-authtool "$k" --create-keyring --gen-key -n mon. --cap mon 'allow *' &&
            ceph-authtool "$DIR/ceph.client.admin.keyring" --create-keyring --gen-key -n client.admin \
                --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' &&
            ceph-authtool "$DIR/ceph.client.txgraph.keyring" --create-keyring --gen-key -n client.txgraph \
                --cap mon 'profile rbd' --cap osd "profile rbd pool=$POOL" &&
            ceph-authtool "$osdk" --create-keyring --gen-key -n "osd.$OSD_ID" \
                --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *' &&
            ceph-authtool "$k" --import-keyring "$DIR/ceph.client.admin.keyring" &&
            ceph-authtool "$k" --import-keyring "$DIR/ceph.client.txgraph.keyring" &&
            ceph-authtool "$k" --import-keyring "$osdk"
    } >"$DIR/log/authtool.out" 2>&1
}

# monmap + mkfs + start for a port pair; returns 2 if the port could not be bound
start_mon() {
    local port=$1 fsid=$2 store=$3 rc=0 mondata=$DIR/mon/ceph-$MON_ID
    write_conf "$port" "$fsid" "$store" || die "up: cannot write $DIR/ceph.conf"
    rm -rf -- "$mondata" "$DIR/monmap"
    mkdir -p -- "$mondata"
    monmaptool --create --fsid "$fsid" --addv "$MON_ID" "[v2:127.0.0.1:$port,v1:127.0.0.1:$((port + 1))]" \
        "$DIR/monmap" >/dev/null 2>"$DIR/log/monmaptool.err" || die "up: monmaptool failed: $(lastline "$DIR/log/monmaptool.err")"
    ceph-mon --conf "$DIR/ceph.conf" --cluster ceph --mkfs -i "$MON_ID" --monmap "$DIR/monmap" \
        --keyring "$DIR/mon.keyring" >"$DIR/log/mon-mkfs.out" 2>&1 \
        || die "up: ceph-mon --mkfs failed: $(lastline "$DIR/log/mon-mkfs.out")"
    # ceph-mon binds before it forks: a taken port makes this exit non-zero at once
    timeout -k 5 "$T_CLI" ceph-mon --conf "$DIR/ceph.conf" -i "$MON_ID" </dev/null >"$DIR/log/mon-start.out" 2>&1 9>&- || rc=$?
    if [ $rc != 0 ]; then
        if grep -qE 'unable to bind|Address already in use' "$DIR/log/mon-start.out" 2>/dev/null; then
            return 2
        fi
        die "up: ceph-mon failed to start (exit $rc): $(lastline "$DIR/log/mon-start.out")"
    fi
    return 0
}

cmd_up() {
    local store=${CEPH_DEV_STORE:-memstore} fsid osd_uuid port tries rc out i b
    case $store in memstore | bluestore) ;; *) die "up: CEPH_DEV_STORE must be memstore or bluestore, not '$store'" ;; esac
    for b in ceph-mon ceph-osd ceph-authtool monmaptool ceph rados rbd uuidgen flock timeout; do
        command -v "$b" >/dev/null || die "up: '$b' not found in PATH (install ceph-mon ceph-osd ceph-common)"
    done

    # (a concurrent `down` may remove DIR while we wait for the lock: make it again)
    for i in 1 2 3; do
        mkdir -p -- "$DIR" || die "up: cannot create $DIR"
        lock_dir && break
        [ $i != 3 ] || die "up: $DIR keeps vanishing"
    done

    if is_ours; then
        if healthy; then
            if [ -n "${CEPH_DEV_STORE:-}" ] && [ -f "$DIR/store" ] && [ "$(cat "$DIR/store")" != "$store" ]; then
                die "up: $DIR runs $(cat "$DIR/store"), not $store; run 'down' first"
            fi
            cat "$DIR/env"
            return 0
        fi
        # half-made or broken (a daemon died, memstore lost its data): start over
        teardown
        find "$DIR" -mindepth 1 -delete 2>/dev/null || rm -rf -- "${DIR:?}"/* "${DIR:?}"/.[!.]* || true
    elif [ -n "$(ls -A "$DIR")" ]; then
        die "up: $DIR is not empty and is not a ceph-dev-cluster directory"
    fi

    fsid=$(uuidgen)
    osd_uuid=$(uuidgen)
    echo "$fsid" >"$DIR/.ceph-dev-cluster"
    mkdir -p -- "$DIR"/{run,log,crash,mon,osd/ceph-$OSD_ID,fuse,maps}
    echo "$fsid" >"$DIR/fsid"
    make_keyrings || die "up: ceph-authtool failed: $(lastline "$DIR/log/authtool.out")"

    # a free mon port pair in 20000-29999; another process may take it first: retry
    tries=0
    while :; do
        tries=$((tries + 1))
        [ $tries -le 30 ] || die "up: no free mon port pair found in 20000-29999 after 30 tries"
        if [ $tries = 1 ] && [ -n "${CEPH_DEV_MON_PORT:-}" ]; then
            # first try on a port of the caller's choice (tests use it to exercise the retry)
            [[ $CEPH_DEV_MON_PORT =~ ^[0-9]+$ ]] && [ "$CEPH_DEV_MON_PORT" -ge 1024 ] &&
                [ "$CEPH_DEV_MON_PORT" -le 65534 ] || die "up: bad CEPH_DEV_MON_PORT '$CEPH_DEV_MON_PORT'"
            port=$CEPH_DEV_MON_PORT
        else
            port=$((20000 + (RANDOM * 32768 + RANDOM) % 9999))
            free_port_pair "$port" || continue
        fi
        rc=0
        start_mon "$port" "$fsid" "$store" || rc=$?
        [ $rc = 0 ] && break
    done

    # register the OSD (its key is already in the auth database), make and start it
    out=$(ceph_cli "$T_CLI" osd new "$osd_uuid" "$OSD_ID" 2>&1) \
        || die "up: 'ceph osd new' failed: ${out##*$'\n'}"
    ceph-osd --conf "$DIR/ceph.conf" -i "$OSD_ID" --mkfs --osd-uuid "$osd_uuid" \
        >"$DIR/log/osd-mkfs.out" 2>&1 || die "up: ceph-osd --mkfs failed: $(lastline "$DIR/log/osd-mkfs.out")"
    timeout -k 5 "$T_CLI" ceph-osd --conf "$DIR/ceph.conf" -i "$OSD_ID" </dev/null >"$DIR/log/osd-start.out" 2>&1 9>&- \
        || die "up: ceph-osd failed to start: $(lastline "$DIR/log/osd-start.out")"

    out=$(ceph_cli "$T_CLI" osd pool create "$POOL" 8 8 2>&1) \
        || die "up: 'ceph osd pool create $POOL' failed: ${out##*$'\n'}"
    out=$(rbd_cli "$T_CLI" pool init "$POOL" 2>&1) || die "up: 'rbd pool init $POOL' failed: ${out##*$'\n'}"
    probe_write "$T_CLI" || die "up: probe write to pool $POOL failed (see $DIR/log)"

    cat >"$DIR/env.tmp" <<EOF
export CEPH_CONF='$DIR/ceph.conf'
export CEPH_KEYRING='$DIR/ceph.client.admin.keyring'
export CEPH_POOL='$POOL'
export CEPH_MON_HOST='[v2:127.0.0.1:$port,v1:127.0.0.1:$((port + 1))]'
export CEPH_DEV_DIR='$DIR'
export CEPH_FSID='$fsid'
export CEPH_TXGRAPH_ID='txgraph'
export CEPH_TXGRAPH_KEYRING='$DIR/ceph.client.txgraph.keyring'
EOF
    mv -f "$DIR/env.tmp" "$DIR/env"
    echo "$store" >"$DIR/store"
    cat "$DIR/env"
}

# --------------------------------------------------------------------------- status

cmd_status() {
    local out
    [ -d "$DIR" ] && is_ours || die "status: no cluster in $DIR"
    [ -n "$(pid_from_file "$DIR/run/mon.$MON_ID.pid" ceph-mon)" ] || die "status: ceph-mon is not running"
    [ -n "$(pid_from_file "$DIR/run/osd.$OSD_ID.pid" ceph-osd)" ] || die "status: ceph-osd is not running"
    out=$(ceph_cli "$T_PROBE" health 2>&1) || die "status: 'ceph health' failed: ${out##*$'\n'}"
    [ "$out" = HEALTH_OK ] || die "status: ${out//$'\n'/ }"
    probe_write "$T_PROBE" || die "status: probe write to pool $POOL failed"
    echo HEALTH_OK
}

# ------------------------------------------------------------------------- map/unmap

check_image() {
    [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "bad image name '$1' (use [A-Za-z0-9][A-Za-z0-9._-]*)"
}

cmd_map() {
    local image=$1 mp rec pid dev out i
    check_image "$image"
    [ -d "$DIR" ] && is_ours || die "map: no cluster in $DIR"
    command -v rbd-fuse >/dev/null || die "map: rbd-fuse not found (install rbd-fuse)"
    [ -e /dev/fuse ] || die "map: /dev/fuse missing"
    lock_dir || die "map: $DIR vanished"
    mp=$DIR/fuse/$image
    rec=$DIR/maps/$image

    # already mapped? print the same device
    if [ -f "$rec.loop" ] && [ -f "$rec.pid" ]; then
        read -r dev <"$rec.loop" || true
        read -r pid <"$rec.pid" || true
        if alive "$pid" && is_mounted "$mp" && loops_backed_under "$mp/$image" | grep -qxF -- "$dev"; then
            echo "$dev"
            return 0
        fi
        unmap_locked "$image"
    fi

    out=$(rbd_cli "$T_CLI" info "$POOL/$image" 2>&1) \
        || die "map: image '$image' not usable in pool $POOL: ${out##*$'\n'}"

    mkdir -p -- "$mp" "$DIR/maps"
    # -f keeps it in the foreground so that we get its PID; setsid detaches it from our
    # session (no job control here, so setsid execs in place and $! is rbd-fuse)
    setsid rbd-fuse -c "$DIR/ceph.conf" -p "$POOL" -r "$image" "$mp" -f \
        </dev/null >"$DIR/log/rbd-fuse.$image.log" 2>&1 9>&- &
    pid=$!
    echo "$pid" >"$rec.pid"
    for ((i = 0; i < 1000; i++)); do
        if is_mounted "$mp" && [ -e "$mp/$image" ]; then break; fi
        alive "$pid" || die "map: rbd-fuse exited: $(lastline "$DIR/log/rbd-fuse.$image.log")"
        sleep 0.01
    done
    [ -e "$mp/$image" ] || { unmap_locked "$image"; die "map: rbd-fuse did not mount $mp within 10 s"; }

    dev=$(losetup --find --show -- "$mp/$image" 2>&1) || {
        unmap_locked "$image"
        die "map: losetup failed: ${dev##*$'\n'}"
    }
    echo "$dev" >"$rec.loop"
    echo "$dev"
}

unmap_locked() {
    local image=$1 mp=$DIR/fuse/$1 rec=$DIR/maps/$1 dev pid
    local -a pids=()
    for dev in $(loops_backed_under "$mp/$image"); do release_loop "$dev"; done
    umount_hard "$mp" || die "unmap: cannot unmount rbd-fuse mount $mp"
    if [ -f "$rec.pid" ]; then
        read -r pid <"$rec.pid" || true
        alive "$pid" && refs_dir "$pid" && pids+=("$pid")
    fi
    stop_pids 5 "${pids[@]}" || die "unmap: rbd-fuse (pid ${pids[*]}) did not exit"
    rm -f -- "$rec.pid" "$rec.loop"
    [ -d "$mp" ] && rmdir -- "$mp" 2>/dev/null
    return 0
}

cmd_unmap() {
    check_image "$1"
    [ -d "$DIR" ] || return 0
    lock_dir || return 0
    unmap_locked "$1"
}

# ----------------------------------------------------------------------------- main

[ $# -ge 2 ] || usage
cmd=$1
DIR=$(canon_dir "$2")
case $cmd in
    up) [ $# -eq 2 ] || usage; cmd_up ;;
    down) [ $# -eq 2 ] || usage; cmd_down ;;
    status) [ $# -eq 2 ] || usage; cmd_status ;;
    map) [ $# -eq 3 ] || usage; cmd_map "$3" ;;
    unmap) [ $# -eq 3 ] || usage; cmd_unmap "$3" ;;
    *) usage ;;
esac
