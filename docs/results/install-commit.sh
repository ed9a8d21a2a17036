# Sourced by the results scripts that time one commit against another: `install_commit REPO COMMIT`
# installs that commit's apb (no dependencies: the repository's .venv has them) into
# /tmp/apb-site-COMMIT once, for PYTHONPATH=/tmp/apb-site-COMMIT, from a directory without an apb/
# folder (so that the installed copy is the one imported).
install_commit() {
  site=/tmp/apb-site-$2
  if [ ! -d "$site" ]; then
    git -C "$1" worktree add -f "/tmp/apb-wt-$2" "$2" --detach >/dev/null 2>&1
    "$1/.venv/bin/python" -m pip install -q --no-deps --no-build-isolation --target "$site" "/tmp/apb-wt-$2" >/dev/null 2>&1
    git -C "$1" worktree remove --force "/tmp/apb-wt-$2"
  fi
}
