# Sourced by the benchmark scripts: `step NAME COMMAND...` runs COMMAND once with --json -q, keeps its last stdout
# line (the command's JSON) as $OUT/NAME.json, its stderr as $OUT/NAME.log and its wall time in $OUT/wall.txt. A step
# whose JSON exists is skipped, so a script resumes where it stopped; a step that fails leaves no JSON.
step() {
  local name=$1; shift
  [ -s "$OUT/$name.json" ] && return 0
  local t0=$SECONDS
  "$@" --json -q > "$OUT/$name.out" 2> "$OUT/$name.log"
  tail -1 "$OUT/$name.out" > "$OUT/$name.json.tmp" && mv "$OUT/$name.json.tmp" "$OUT/$name.json"
  rm -f "$OUT/$name.out"
  echo "$name: $((SECONDS - t0)) s" >> "$OUT/wall.txt"
}
