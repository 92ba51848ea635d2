# run_code's per-cell client, run by an ordinary exec as
#   bash --norc --noprofile -c "$(this file)" mvm-code OP CONTEXT WAIT LIMIT NONCE
# Builtins only: under TCG a cell must not pay an interpreter's start-up (python3 -I -S
# alone costs ~0.7 s there; bash ~0.05 s).
#
# The context's server (code_server.py) does the work through /proc/<our pid>/fd: it reads
# the cell from our stdin, writes the cell's output and the result record (behind
# "\x1eMVMCODE:<nonce>\n") to our stdout and stderr, and says "done" on our fd 3. We only
# ask (our pid on the context's request FIFO, in a 0700 directory only this user can
# enter) and wait. Our own records, in the same form: no_context (no server, or none came
# up within WAIT seconds), busy (the server did not take the request), died (the server
# ended mid-cell), killed (no answer LIMIT seconds after the request: the server got its
# interrupt at the cell's timeout and ignored it, so every process of the context is
# killed). OP kill kills a context; OP list names the live ones.
#
# Only `read -u` after the request: a redirection such as `<&3` would briefly point
# fd 0/1/2 elsewhere while the server may be opening them.
op=$1 c=$2 wait=$3 limit=$4 nonce=$5
d=/tmp/.mvm-code-$UID
rec() { printf '\036MVMCODE:%s\n{"status": "%s"%s}\n' "$nonce" "$1" "$2"; exit 0; }
# Glob tests, not regexes: compiling a regex costs milliseconds under TCG.
name() { [[ $1 && ${#1} -le 63 && $1 != [_-]* && $1 != *[!a-z0-9_-]* ]]; }
if ! [[ ${#nonce} -eq 32 && $nonce != *[!0-9a-f]* && $wait && $wait != *[!0-9]* &&
  $limit && $limit != *[!0-9.]* ]] || ! name "$c"; then
  echo "mvm-code: bad arguments" >&2
  exit 2
fi
live() {  # $1: context; true if its server runs (pid in $spid)
  [[ -O $d && -p $d/$1.req ]] && read -r spid 2>/dev/null <"$d/$1.pid" &&
    [[ $spid && $spid != *[!0-9]* ]] && kill -0 "$spid" 2>/dev/null
}
kill_context() {
  local pg pgs=()
  [[ -O $d ]] && read -r -a pgs 2>/dev/null <"$d/$c.pgids"
  : 2>/dev/null >"$d/$c.pid"
  for pg in "${pgs[@]}"; do
    [[ $pg && $pg != *[!0-9]* ]] && ((pg > 1 && pg != $$)) && kill -9 -- "-$pg" 2>/dev/null
  done
}
case $op in
list)
  names=
  for f in "$d"/*.req; do
    n=${f##*/}
    n=${n%.req}
    name "$n" && live "$n" && names+="${names:+, }\"$n\""
  done
  rec ok ", \"contexts\": [$names]"
  ;;
kill)
  kill_context
  rec killed
  ;;
run) ;;
*)
  echo "mvm-code: bad operation" >&2
  exit 2
  ;;
esac
# fd 3: a pipe only we read; fd 4 our own writer (so reads wait instead of seeing EOF)
# until the server holds one.
exec 3<<<"" 4>/proc/self/fd/3 || rec no_context
read -r -u 3 _
n=0
until live "$c"; do
  ((n++ < wait * 20)) || rec no_context
  read -r -u 3 -t 0.05 _
done
printf '%s\n' "$$" 1<>"$d/$c.req"
read -r -u 3 -t 30 ack || rec busy
[[ $ack == ack ]] || rec unreachable # the server may not copy our fds (ptrace rights)
exec 4>&-
read -r -u 3 -t "$limit" st
rc=$?
[[ $st == done ]] && exit 0
if ((rc > 128)); then
  kill_context
  rec killed ', "timed_out": true, "outputs": []'
fi
rec died ', "outputs": []'
