#!/usr/bin/env python3
"""Checks that a Dockerfile's build stage configures with exactly what it is given.

1. Computes the build context as Docker/podman would: every file of the tree that .dockerignore
   does not exclude (moby pattern semantics: last matching pattern wins, `!` re-includes, a
   pattern that matches a parent folder excludes what is below it, `**` spans folders), and
   fails when it exceeds --max-context-mb (a tree after `make test` holds ~215 MB).
2. Copies into a temporary folder the files that the Dockerfile's COPY instructions (not
   `COPY --from`) take from that context to places under WORKDIR, laid out as in the image,
   and fails when a COPY source is missing from the context.
3. Runs `cmake -S TMP -B TMP/build` with the given -D options (configure only).

    python3 tests/deploy/check_docker_context.py Dockerfile -- -DLOSSD_BUILD_TESTS=OFF -DLOSSD_CUDA=OFF
"""
import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ignore_patterns(path):
    patterns = []
    if not os.path.exists(path):
        return patterns
    for line in open(path):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        if not exclude:
            line = line[1:].strip()
        line = os.path.normpath(line).lstrip("/")
        patterns.append((exclude, pattern_regex(line), line))
    return patterns


def pattern_regex(pattern):
    """moby/patternmatcher: * and ? never cross '/', ** crosses any number of folders."""
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if i < len(pattern) and pattern[i] == "/":
                out += "(.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        else:
            out += re.escape(c)
        i += 1
    return re.compile("^" + out + "$")


def excluded(relpath, patterns):
    parents = relpath.split("/")
    candidates = ["/".join(parents[: i + 1]) for i in range(len(parents))]
    result = False
    for exclude, regex, _ in patterns:
        if any(regex.match(c) for c in candidates):
            result = exclude
    return result


def context_files(patterns):
    """Relative paths of the files in the build context."""
    reincludes = [p for ex, _, p in patterns if not ex]
    files = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel = os.path.relpath(dirpath, ROOT)
        rel = "" if rel == "." else rel + "/"
        keep = []
        for d in dirnames:
            r = rel + d
            # Walk into an excluded folder only if a `!` pattern may re-include below it.
            if not excluded(r, patterns) or any(p.startswith(r + "/") or p.startswith("**")
                                                for p in reincludes):
                keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            r = rel + f
            if not excluded(r, patterns) and not os.path.islink(os.path.join(ROOT, r)):
                files.append(r)
    return files


def instructions(dockerfile):
    text = open(dockerfile).read()
    text = re.sub(r"\\\n", " ", text)
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            yield word.upper(), rest.strip()


def copies(dockerfile):
    """(sources, dest) of COPY/ADD from the context whose dest lies under WORKDIR."""
    workdir = "/"
    out = []
    for word, rest in instructions(dockerfile):
        if word == "FROM":
            workdir = "/"
        elif word == "WORKDIR":
            workdir = os.path.join(workdir, rest)
        elif word in ("COPY", "ADD"):
            args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
            flags = [a for a in args if a.startswith("--")]
            args = [a for a in args if not a.startswith("--")]
            if any(f.startswith("--from") for f in flags):
                continue
            *sources, dest = args
            absdest = os.path.normpath(os.path.join(workdir, dest))
            under = os.path.relpath(absdest, workdir) if workdir != "/" else None
            out.append((sources, dest, under))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dockerfile")
    ap.add_argument("--max-context-mb", type=float, default=20.0)
    ap.add_argument("cmake_args", nargs="*", help="after --: -D options for cmake")
    args = ap.parse_args()
    os.chdir(ROOT)
    patterns = ignore_patterns(".dockerignore")
    files = context_files(patterns)
    size = sum(os.path.getsize(f) for f in files)
    print(f"{args.dockerfile}: build context {len(files)} files, {size / 1e6:.2f} MB "
          f"(.dockerignore: {len(patterns)} patterns)")
    ok = True
    if size > args.max_context_mb * 1e6:
        print(f"FAIL: context over {args.max_context_mb} MB: check .dockerignore")
        ok = False
    fileset = set(files)
    with tempfile.TemporaryDirectory(prefix="lossd-docker-context-") as tmp:
        src = os.path.join(tmp, "src")
        os.makedirs(src)
        for sources, dest, under in copies(args.dockerfile):
            for s in sources:
                s = os.path.normpath(s)
                hits = [f for f in files if f == s or f.startswith(s + "/")]
                if not hits:
                    print(f"FAIL: COPY {s}: not in the build context (missing, or excluded "
                          f"by .dockerignore)")
                    ok = False
                    continue
                if under is None or under.startswith(".."):
                    print(f"  COPY {s} -> {dest} ({len(hits)} files; outside WORKDIR)")
                    continue
                single_file = hits == [s] and s in fileset
                for f in hits:
                    if single_file:
                        target = (os.path.join(under, os.path.basename(s))
                                  if dest.endswith("/") or len(sources) > 1 else under)
                    else:
                        target = os.path.join(under, os.path.relpath(f, s))
                    t = os.path.normpath(os.path.join(src, target))
                    os.makedirs(os.path.dirname(t), exist_ok=True)
                    shutil.copy2(f, t)
                print(f"  COPY {s} -> {dest} ({len(hits)} files)")
        if not ok:
            return 1
        cmd = ["cmake", "-S", src, "-B", os.path.join(tmp, "build")] + args.cmake_args
        print("  " + " ".join(cmd[:1] + ["-S", "TMP/src", "-B", "TMP/build"] + args.cmake_args))
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            print(r.stdout[-6000:])
            print(f"FAIL: cmake configure of the {args.dockerfile} context exited {r.returncode}")
            return 1
        tail = [ln for ln in r.stdout.splitlines() if "lossd:" in ln or "Generating done" in ln]
        print("  " + "\n  ".join(tail))
    print(f"{args.dockerfile}: context and CMake configure OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
