#!/bin/sh
# Builds the site served by the hello app into ./www: the index page and the health check.
set -eu
mkdir -p www
cp index.html www/index.html
echo ok > www/healthz
