#!/bin/sh
# One-shot set-up of the MinIO server of the nptm cluster (the `minio-init` service).
#
# Creates the buckets `mlflow` (MLflow artifacts) and `nptm` (sweep results and stage
# artifacts), and the S3 user that MLflow and the Ray nodes use, so that the MinIO root
# credentials stay with MinIO and this script. That user may touch these two buckets only
# (deploy/minio-policy.json). Safe to run again: every step is idempotent.
set -eu

die() {
    echo "minio-init: $*" >&2
    exit 64
}

for name in MINIO_ROOT_USER MINIO_ROOT_PASSWORD S3_ACCESS_KEY S3_SECRET_KEY; do
    eval "value=\${$name:-}"
    [ -n "$value" ] || die "$name is empty; set it in .env (see .env.example)"
    case "$value" in
        CHANGEME*) die "$name is still the .env.example placeholder; replace it in .env" ;;
    esac
done
[ "${#S3_SECRET_KEY}" -ge 8 ] || die "S3_SECRET_KEY must have at least 8 characters (MinIO's minimum)"
[ "$S3_ACCESS_KEY" != "$MINIO_ROOT_USER" ] || die "S3_ACCESS_KEY must differ from MINIO_ROOT_USER"

endpoint="${MINIO_ENDPOINT:-http://minio:9000}"
mc alias set nptm "$endpoint" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing nptm/mlflow nptm/nptm

# `user add` on an existing user only resets its secret, so a rotated S3_SECRET_KEY takes effect.
mc admin user add nptm "$S3_ACCESS_KEY" "$S3_SECRET_KEY" >/dev/null
# `policy create` replaces an existing policy of that name, so edits to the file apply.
mc admin policy create nptm nptm-buckets "${MINIO_POLICY_FILE:-/deploy/minio-policy.json}" >/dev/null
# `policy attach` fails when the policy is already attached: accept that case, nothing else.
if ! mc admin policy attach nptm nptm-buckets --user "$S3_ACCESS_KEY" >/dev/null 2>&1; then
    mc admin user info nptm "$S3_ACCESS_KEY" | grep -q nptm-buckets \
        || die "could not attach policy nptm-buckets to user $S3_ACCESS_KEY"
fi
echo "minio-init: buckets mlflow and nptm ready; user $S3_ACCESS_KEY may use them"
