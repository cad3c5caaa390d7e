# The python:3.11-slim stand-in: the debootstrapped bookworm base (Python 3.11, venv,
# python -> python3) plus this host's CA bundle, so pip inside `docker build` trusts what
# the host trusts. Built by deploy/compose/standin/build.sh.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV LANG=C.UTF-8
CMD ["python3"]
