#!/usr/bin/env bash
# Build agentd's .deb and .rpm: agentd and every dependency as wheels for each supported python
# ABI under /opt/agentd/wheels, plus the units, sysusers/tmpfiles snippets and /etc/agentd
# conffiles, packed by nfpm (packaging/nfpm.yaml). The virtualenv is made at install time, offline,
# by /opt/agentd/libexec/agentd-venv with the target's own python (packaging/README.md says why).
#
#   packaging/build.sh stage          # wheelhouse staged under $BUILD_DIR/stage
#   packaging/build.sh deb|rpm        # pack the staged tree into $OUT_DIR
#
# Environment: TARGET (deb: "debian", one package for Debian 12/13 and Ubuntu 22.04/24.04; rpm:
# "el9" or "el10", default el9), BUILD_DIR (default build/package), OUT_DIR (default dist),
# BUILD_PYTHON (the python whose pip builds and downloads the wheels, default .venv/bin/python),
# PYTHONS (the ABIs to carry, default "3.10 3.11 3.12 3.13"), NFPM (default .venv/bin/nfpm),
# VERSION (default agentd.__version__), RELEASE (default 1), SOURCE_DATE_EPOCH (default: the last
# commit's time, so two builds of one commit are byte-identical).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
top="$(dirname "${here}")"
BUILD_DIR="$(realpath -m "${BUILD_DIR:-${top}/build/package}")"
OUT_DIR="$(realpath -m "${OUT_DIR:-${top}/dist}")"
BUILD_PYTHON="${BUILD_PYTHON:-${top}/.venv/bin/python}"
PYTHONS="${PYTHONS:-3.10 3.11 3.12 3.13}"
NFPM="${NFPM:-$(dirname "${BUILD_PYTHON}")/nfpm}"
if [[ -z "${SOURCE_DATE_EPOCH:-}" ]]; then
    SOURCE_DATE_EPOCH="$(git -C "${top}" log -1 --format=%ct 2>/dev/null || echo 1700000000)"
fi
export SOURCE_DATE_EPOCH
stage="${BUILD_DIR}/stage"
prefix=/opt/agentd
# manylinux tags up to glibc 2.34 (EL9); Debian 12 has 2.36, Ubuntu 22.04 2.35.
platforms=(manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64 manylinux_2_34_x86_64)

pip_() {
    # No pip.conf or PIP_* of the build machine's (an extra find-links, say) gets into the set.
    env PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_NO_INDEX= "${BUILD_PYTHON}" -m pip \
        --disable-pip-version-check --quiet "$@"
}

do_stage() {
    local wheels="${stage}${prefix}/wheels" src="${BUILD_DIR}/src" version
    rm -rf "${stage}" "${src}"
    mkdir -p "${wheels}" "${stage}${prefix}/libexec"
    # Build from a copy of the tracked files only: no stray build/ or egg-info from the work tree.
    mkdir -p "${src}"
    git -C "${top}" ls-files -z --cached --others --exclude-standard \
        | (cd "${top}" && xargs -0 cp --parents -t "${src}" 2>/dev/null || true)
    pip_ wheel --no-deps -w "${wheels}" "${src}"
    pip_ wheel --no-deps --no-binary pyinotify -w "${wheels}" pyinotify==0.9.6
    local pins
    pins="$(grep -v '^#' "${here}/wheels.txt" | grep .)"
    local plat=()
    for p in "${platforms[@]}"; do plat+=(--platform "$p"); done
    for py in ${PYTHONS}; do
        # shellcheck disable=SC2086
        pip_ download --no-deps --only-binary=:all: --implementation cp --python-version "${py}" \
            "${plat[@]}" -d "${wheels}" ${pins}
    done
    # A python that needs a wheel the set lacks would fail at install: check each ABI here.
    for py in ${PYTHONS}; do
        pip_ install --dry-run --ignore-installed --no-index --find-links "${wheels}" \
            --only-binary=:all: --implementation cp --python-version "${py}" "${plat[@]}" \
            --target "${BUILD_DIR}/dry-${py}" agentd >/dev/null
    done
    rm -rf "${BUILD_DIR}"/dry-*
    install -m 0755 "${here}/agentd-venv" "${stage}${prefix}/libexec/agentd-venv"
    rm -rf "${src}"
    find "${stage}" -exec touch -h -d "@${SOURCE_DATE_EPOCH}" {} +
    touch "${stage}/.staged"
}

do_pack() {
    local format="$1" version release target deps
    [[ -f "${stage}/.staged" ]] || do_stage
    version="${VERSION:-$("${BUILD_PYTHON}" -c 'import sys; sys.path.insert(0, sys.argv[1]); import agentd; print(agentd.__version__)' "${top}")}"
    release="${RELEASE:-1}"
    case "${format}:${TARGET:-}" in
        deb:|deb:debian) target=debian
            # python3 3.10 (Ubuntu 22.04) to 3.13 (Debian 13): the ABIs whose wheels are inside.
            deps='"python3 (>= 3.10)", "python3 (<< 3.14)", "systemd"' ;;
        rpm:|rpm:el9) target=el9
            # EL9's python3 is 3.9: the package names the newer python it needs (AppStream).
            deps='"(python3.12 or python3.11)", "systemd"' ;;
        rpm:el10) target=el10
            deps='"python3 >= 3.12", "python3 < 3.14", "systemd"' ;;
        *) echo "build.sh: no target ${TARGET} for ${format} (deb: debian; rpm: el9, el10)" >&2
           exit 2 ;;
    esac
    mkdir -p "${OUT_DIR}"
    local file="${OUT_DIR}/agentd_${version}-${release}_amd64.deb"
    if [[ "${format}" == rpm ]]; then
        release="${release}.${target}"          # the EL way: agentd-0.1.0-1.el9.x86_64.rpm
        file="${OUT_DIR}/agentd-${version}-${release}.x86_64.rpm"
    fi
    # The repo's files, with one mtime: the package does not depend on when the clone was made.
    local files="${BUILD_DIR}/files"
    rm -rf "${files}"
    mkdir -p "${files}"
    (cd "${top}" && cp -r --parents systemd config docs README.md LICENSE packaging/scripts \
        packaging/copyright "${files}")
    # Debian's changelog.gz, reproducible (gzip -n: no name, no time).
    gzip -9n < "${here}/changelog" > "${files}/changelog.gz"
    find "${files}" -exec touch -h -d "@${SOURCE_DATE_EPOCH}" {} +
    # nfpm expands variables in a few fields only: fill the template's ${AGENTD_*} here.
    sed -e "s|\${AGENTD_STAGE}|${stage}${prefix}|g" -e "s|\${AGENTD_TOP}|${files}|g" \
        -e "s|\${AGENTD_VERSION}|${version}|g" -e "s|\${AGENTD_RELEASE}|${release}|g" \
        -e "s|\${AGENTD_DEPENDS}|[${deps}]|g" \
        "${here}/nfpm.yaml" > "${BUILD_DIR}/nfpm.yaml"
    "${NFPM}" package --config "${BUILD_DIR}/nfpm.yaml" --packager "${format}" \
        --target "${file}" >/dev/null
    echo "${file}"
}

case "${1:-}" in
    stage) do_stage ;;
    deb|rpm) do_pack "$1" ;;
    *) echo "usage: $0 stage|deb|rpm" >&2; exit 2 ;;
esac
