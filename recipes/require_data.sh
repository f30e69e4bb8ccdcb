# Sourced by the GPU recipes' run scripts: `require_data FILE... -- "$@"` exits with a clear message
# when a default data file is missing, unless the overrides after `--` set data.train_files or
# data.val_files themselves.
require_data() {
    local files=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do files+=("$1"); shift; done
    shift
    if [[ " $* " == *" data.train_files="* || " $* " == *" data.val_files="* ]]; then
        return 0
    fi
    for f in "${files[@]}"; do
        if [[ ! -f "$f" ]]; then
            echo "missing $f: prepare the data with verl's scripts first (recipes/README.md, 'Data')" >&2
            exit 1
        fi
    done
}
