# shellcheck shell=bash
# need_tools TOOL...: sourced by tests/e2e/run.sh and tests/kind/run.sh before
# they start anything. Says which tools are not on PATH and what to do, instead
# of failing later with "go: command not found" (and a Python traceback from
# the next line that reads go's output). The usual cause: sudo's secure_path
# (Debian's /etc/sudoers) keeps only the system directories, so Go
# (/usr/local/go/bin) and cargo (~/.cargo/bin) are not found under
# `sudo bash ...`.
need_tools() {
    local tool missing=()
    for tool in "$@"; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    echo "not found on PATH ($PATH): ${missing[*]}" >&2
    echo "Under sudo, secure_path drops the directories of Go and cargo: run it as" >&2
    echo "  sudo env \"PATH=\$PATH\" bash $0" >&2
    echo "(Go: https://go.dev/doc/install; Rust: rustup; Debian packages: apt-get install <name>)" >&2
    return 1
}
