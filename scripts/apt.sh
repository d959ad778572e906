# Sourced by the install scripts (after they define die): Debian packages installed as root,
# or through `sudo -n` when not root, without prompts.

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo -n "$@" || die "need root to run: $* (sudo -n failed)"
  else
    die "need root (or sudo) to run: $*"
  fi
}

# apt_install MISSING BY_HAND PACKAGE...: without apt-get, die naming what is missing and
# what to install by hand instead
apt_install() {
  local missing=$1 by_hand=$2
  shift 2
  command -v apt-get >/dev/null 2>&1 || die "$missing is missing and apt-get is not available; install $by_hand by hand"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
