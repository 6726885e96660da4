# factory in a container, set up by the same script as a bare machine.
# Building images needs privileges (chroot mounts, binfmt for foreign arches):
#   docker build -t factory .
#   docker run --rm --privileged -v "$PWD/out:/src/out" -v factory-cache:/var/cache/factory \
#     factory matrix/default.toml
FROM debian:bookworm
WORKDIR /src
COPY . /src
RUN rm -rf /src/.venv && scripts/setup && rm -rf /var/lib/apt/lists/*
ENV PATH=/src/.venv/bin:$PATH
ENTRYPOINT ["factory", "run"]
CMD ["matrix/default.toml"]
