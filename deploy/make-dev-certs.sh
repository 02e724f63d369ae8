#!/bin/sh
# Development certificates and a tokens file for `compose.secure.yaml`, written to deploy/secrets/ (or $1, or
# $HPS_DEV_SECRETS, the folder compose.secure.yaml reads):
# a throwaway CA, the server's certificate (hps, localhost, 127.0.0.1), a client certificate for callers,
# the Redis nodes' certificate (redis-1..3) and hps's client certificate for Redis, and two tokens.
# Keys are left readable by everyone so the containers' users can read the bind-mounted files: never use
# these outside a development machine. Needs openssl; an existing folder is left as it is.
set -eu
out="${1:-${HPS_DEV_SECRETS:-secrets}}"
# A relative HPS_DEV_SECRETS is deploy/'s, as compose.secure.yaml reads it; a relative $1 the caller's.
if [ -z "${1:-}" ]; then case "$out" in /*) ;; *) out="$(dirname "$0")/$out" ;; esac; fi
if [ -e "$out/ca.crt" ]; then echo "$out already holds certificates"; exit 0; fi
mkdir -p "$out"
cd "$out"

sign() {  # sign NAME SUBJECT [SUBJECT_ALT_NAMES]
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$1.key" -out "$1.csr" -subj "/CN=$2" 2>/dev/null
  if [ -n "${3:-}" ]; then printf 'subjectAltName=%s\n' "$3" > "$1.ext"; else : > "$1.ext"; fi
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -out "$1.crt" \
    -extfile "$1.ext" 2>/dev/null
  rm "$1.csr" "$1.ext"
}

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.crt -days 30 -subj "/CN=hps-dev-ca" 2>/dev/null
sign server hps "DNS:hps,DNS:localhost,IP:127.0.0.1"
sign client hps-dev-client
sign redis redis "DNS:redis-1,DNS:redis-2,DNS:redis-3"
sign redis-client hps
rm ca.key ca.srl
chmod 0644 ./*.key

reader=$(openssl rand -hex 24)
writer=$(openssl rand -hex 24)
cat > tokens.yaml <<TOKENS
# Bearer tokens of the development stack (server.auth.tokens_file).
tokens:
  - token: "$reader"
    read: ["*"]
    write: []
    admin: []
  - token: "$writer"
    read: ["*"]
    write: ["*"]
    admin: []
TOKENS
printf '%s\n' "$reader" > reader.token
echo "wrote $out (reader token in reader.token)"
