#!/usr/bin/env bash
# Mutation score: plant each one-line bug of scripts/mutants.txt in a scratch copy of the
# working tree, run the tests that should catch it, and print caught / missed per test command.
#
#   scripts/mutants.sh                       every mutant
#   scripts/mutants.sh adam-eps clip         only the mutants whose id contains one of the words
#   SCRATCH=/tmp/m scripts/mutants.sh        the scratch copy (default /tmp/senet-mutants); its
#                                            target/ is kept between runs (incremental builds)
#
# mutants.txt: one mutant a line, fields separated by " ||| ":
#   id ||| file ||| n ||| original text ||| replacement ||| test commands
# The n-th occurrence (1-based) of the original text in the file is replaced (either text may span
# lines, each break written \n); a mutant whose text
# is not found that many times is reported STALE. Test commands are `cargo test` arguments,
# several separated by " ;; "; each is run on its own and reported caught (the tests failed) or
# missed (they passed); build where the mutant does not compile (a bad mutant, not a catch).
# The unmutated tree is built and the commands run first: a command that fails there
# makes its column meaningless, and the script stops.
#
# Slow (each mutant rebuilds the crate): on a shared 2-core machine ~2-4 minutes a mutant.
# Output: a table on stdout and in $SCRATCH/mutants.md (markdown, for docs/testing.md).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LIST="$ROOT/scripts/mutants.txt"
SCRATCH=${SCRATCH:-/tmp/senet-mutants}
JOBS=${CARGO_BUILD_JOBS:-2}
SEP=' ||| '

mkdir -p "$SCRATCH/tree"
# The working tree as it is (tracked and untracked, not ignored files), over the scratch copy;
# extracted with fresh times (-m), or a file a previous run left mutated and restored would keep
# the working tree's older time and cargo would reuse the mutated build.
(cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xmf - -C "$SCRATCH/tree"
cd "$SCRATCH/tree"
export CARGO_TARGET_DIR="$SCRATCH/target" CARGO_BUILD_JOBS="$JOBS"

# The mutants to run.
mapfile -t LINES < <(grep -v '^\s*#' "$LIST" | grep -v '^\s*$')
if [ $# -gt 0 ]; then
    sel=()
    for l in "${LINES[@]}"; do
        id=${l%%"$SEP"*}
        for w in "$@"; do
            if [[ "$id" == *"$w"* ]]; then sel+=("$l"); break; fi
        done
    done
    LINES=("${sel[@]}")
fi

field() { # field N LINE
    python3 -c 'import sys; print(sys.argv[2].split(" ||| ")[int(sys.argv[1])])' "$1" "$2"
}

# Replace the n-th occurrence of ORIGINAL by REPLACEMENT in FILE; exit 3 if there are fewer.
mutate() {
    python3 - "$@" <<'EOF'
import sys
path, n, old, new = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
# A mutant spanning lines spells each line break \n.
old, new = old.replace("\\n", "\n"), new.replace("\\n", "\n")
s = open(path).read()
at = -1
for _ in range(n):
    at = s.find(old, at + 1)
    if at < 0:
        sys.exit(3)
open(path, "w").write(s[:at] + new + s[at + len(old):])
EOF
}

run_tests() { # run_tests "CMD ;; CMD" -> one word per command: caught | missed | build
    local cmds=$1 out=()
    IFS=$'\n' read -r -d '' -a parts < <(python3 -c 'import sys; print("\n".join(c.strip() for c in sys.argv[1].split(";;")))' "$cmds"; printf '\0') || true
    for c in "${parts[@]}"; do
        # shellcheck disable=SC2086
        if nice -n 10 timeout 900 cargo test -q $c >"$SCRATCH/last-test.log" 2>&1; then
            out+=("missed")
        elif grep -q "could not compile" "$SCRATCH/last-test.log"; then
            out+=("build")
        else
            out+=("caught")
        fi
    done
    echo "${out[*]}"
}

echo "baseline: building and running every command on the unmutated tree"
all_cmds=$(for l in "${LINES[@]}"; do field 5 "$l"; done | python3 -c 'import sys
seen = []
for line in sys.stdin:
    for c in line.split(";;"):
        c = c.strip()
        if c and c not in seen:
            seen.append(c)
print(" ;; ".join(seen))')
base=$(run_tests "$all_cmds")
if [[ "$base" != *missed* ]] || [[ "$base" == *caught* ]] || [[ "$base" == *build* ]]; then
    echo "the unmutated tree fails a command ($all_cmds -> $base); see $SCRATCH/last-test.log" >&2
    exit 1
fi

TABLE="$SCRATCH/mutants.md"
echo "| mutant | file | tests: result |" >"$TABLE"
echo "| --- | --- | --- |" >>"$TABLE"
caught=0 missed=0 other=0
for l in "${LINES[@]}"; do
    id=$(field 0 "$l"); file=$(field 1 "$l"); n=$(field 2 "$l")
    old=$(field 3 "$l"); new=$(field 4 "$l"); cmds=$(field 5 "$l")
    cp "$file" "$SCRATCH/pristine"
    status=""
    if ! mutate "$file" "$n" "$old" "$new"; then
        status="STALE (the original text is not in $file)"
        other=$((other + 1))
    else
        res=$(run_tests "$cmds")
        IFS=$'\n' read -r -d '' -a parts < <(python3 -c 'import sys; print("\n".join(c.strip() for c in sys.argv[1].split(";;")))' "$cmds"; printf '\0') || true
        i=0
        for r in $res; do
            status+="${status:+; }\`${parts[$i]}\`: $r"
            i=$((i + 1))
        done
        if [[ "$res" == *build* ]]; then
            other=$((other + 1))
        elif [[ "$res" == *caught* ]]; then
            caught=$((caught + 1))
        else
            missed=$((missed + 1))
        fi
    fi
    cp "$SCRATCH/pristine" "$file"
    printf '%-34s %s\n' "$id" "$status"
    echo "| $id | $file | $status |" >>"$TABLE"
done
echo "caught $caught, missed $missed, stale or not compiling $other (of ${#LINES[@]})"
echo "" >>"$TABLE"
echo "caught $caught, missed $missed, stale or not compiling $other (of ${#LINES[@]})" >>"$TABLE"
