# factory in a container, set up by the same script as a bare machine.
#   docker build -t factory .
#   docker run --rm --privileged -v "$PWD/out:/src/out" -v factory-cache:/var/cache/factory \
#     factory matrix/default.toml
# BASE is any Debian 12 image: a registry's, or one factory built (its docker format), e.g.
#   docker load -i out/default/debian-bookworm-amd64/debian-bookworm-amd64.docker.tar
#   docker build --build-arg BASE=default/debian:bookworm-amd64 -t factory .
# What a run in it needs (measured with buildah; README, "More than one machine"): tree
# formats and the default disk formats, CAP_SYS_ADMIN on top of Docker's default set
# (`--cap-add SYS_ADMIN`: mmdebstrap's and finalise's mounts in the tree; the defaults
# already have MKNOD and SYS_CHROOT); --loop and xfs partitions, loop devices too; foreign
# arches, binfmt_misc, which factory mounts itself with CAP_SYS_ADMIN. --privileged: all.
ARG BASE=debian:bookworm
FROM $BASE
WORKDIR /src
COPY . /src
# factory's "host" mirror is read from debian.sources or sources.list; an image factory
# built names its sources as mmdebstrap does (0000apt.sources).
RUN cd /etc/apt && if [ ! -e sources.list ] && [ ! -e sources.list.d/debian.sources ] \
      && [ -e sources.list.d/0000apt.sources ]; then \
      mv sources.list.d/0000apt.sources sources.list.d/debian.sources; fi
RUN scripts/setup && rm -rf /var/lib/apt/lists/* /root/.cache
ENV PATH=/src/.venv/bin:$PATH
ENTRYPOINT ["factory", "run"]
CMD ["matrix/default.toml"]
