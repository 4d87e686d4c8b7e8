#!/usr/bin/env python3
"""Checks that a Dockerfile's build stage configures with exactly what it is given.

1. Computes the build context as Docker/podman would: every file of the tree that .dockerignore
   does not exclude (moby pattern semantics: last matching pattern wins, `!` re-includes, a
   pattern that matches a parent folder excludes what is below it, `**` spans folders), and
   fails when it exceeds --max-context-mb (a tree after `make test` holds ~215 MB).
2. Copies into a temporary folder the files that the COPY instructions (not `COPY --from`) of
   the stages a target builds (--target, default the last stage; the stages it is built FROM
   or copies --from, recursively) take from that context to places under WORKDIR, laid out as
   in the image, and fails when a COPY source is missing from the context.
3. Runs `cmake -S TMP -B TMP/build` with the given -D options (configure only).

    python3 tests/deploy/check_docker_context.py Dockerfile -- -DLOSSD_BUILD_TESTS=OFF -DLOSSD_CUDA=OFF
    python3 tests/deploy/check_docker_context.py Dockerfile --target loadtest -- \
        -DLOSSD_BUILD_TESTS=OFF -DLOSSD_BUILD_TOOLS=ON -DLOSSD_CUDA=OFF
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


def stages(dockerfile):
    """The stages in order: dicts with name, base, deps (stages it needs) and copies.

    A stage built FROM another stage starts in that stage's WORKDIR (as Docker does).
    copies: (sources, dest, under) of COPY/ADD from the context (not `--from`), under being
    dest relative to the WORKDIR at that point, None when that is "/"."""
    out = []
    by_name = {}
    for word, rest in instructions(dockerfile):
        if word == "FROM":
            args = [a for a in rest.split() if not a.startswith("--")]
            base = args[0]
            name = args[2] if len(args) >= 3 and args[1].upper() == "AS" else f"stage-{len(out)}"
            parent = by_name.get(base)
            stage = {"name": name, "base": base, "deps": {base} & set(by_name),
                     "workdir": parent["workdir"] if parent else "/", "copies": []}
            out.append(stage)
            by_name[name] = stage
        elif not out:
            continue  # ARG before the first FROM
        elif word == "WORKDIR":
            out[-1]["workdir"] = os.path.join(out[-1]["workdir"], rest)
        elif word in ("COPY", "ADD"):
            args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
            flags = [a for a in args if a.startswith("--")]
            args = [a for a in args if not a.startswith("--")]
            source_stage = [f.split("=", 1)[1] for f in flags if f.startswith("--from=")]
            if source_stage:
                if source_stage[0] in by_name:
                    out[-1]["deps"].add(source_stage[0])
                continue
            *sources, dest = args
            workdir = out[-1]["workdir"]
            absdest = os.path.normpath(os.path.join(workdir, dest))
            under = os.path.relpath(absdest, workdir) if workdir != "/" else None
            out[-1]["copies"].append((sources, dest, under))
    return out


def copies(dockerfile, target=None):
    """(sources, dest, under) of the COPY/ADD from the context in the stages that building
    `target` (default: the last stage, as `docker build` without --target) runs."""
    all_stages = stages(dockerfile)
    by_name = {st["name"]: st for st in all_stages}
    if target is not None and target not in by_name:
        raise SystemExit(f"{dockerfile}: no stage named {target!r} "
                         f"(stages: {', '.join(st['name'] for st in all_stages)})")
    needed = set()
    todo = [target or all_stages[-1]["name"]]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(by_name[name]["deps"])
    names = [st["name"] for st in all_stages if st["name"] in needed]
    return names, [c for st in all_stages if st["name"] in needed for c in st["copies"]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dockerfile")
    ap.add_argument("--target", help="the stage to build (default: the last one)")
    ap.add_argument("--max-context-mb", type=float, default=20.0)
    ap.add_argument("cmake_args", nargs="*", help="after --: -D options for cmake")
    argv = sys.argv[1:]
    cmake_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.cmake_args += cmake_args
    os.chdir(ROOT)
    patterns = ignore_patterns(".dockerignore")
    files = context_files(patterns)
    size = sum(os.path.getsize(f) for f in files)
    label = args.dockerfile + (f" --target {args.target}" if args.target else "")
    print(f"{label}: build context {len(files)} files, {size / 1e6:.2f} MB "
          f"(.dockerignore: {len(patterns)} patterns)")
    stage_names, stage_copies = copies(args.dockerfile, args.target)
    print(f"  stages built: {', '.join(stage_names)}")
    ok = True
    if size > args.max_context_mb * 1e6:
        print(f"FAIL: context over {args.max_context_mb} MB: check .dockerignore")
        ok = False
    fileset = set(files)
    with tempfile.TemporaryDirectory(prefix="lossd-docker-context-") as tmp:
        src = os.path.join(tmp, "src")
        os.makedirs(src)
        for sources, dest, under in stage_copies:
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
            print(f"FAIL: cmake configure of the {label} context exited {r.returncode}")
            return 1
        tail = [ln for ln in r.stdout.splitlines() if "lossd:" in ln or "Generating done" in ln]
        print("  " + "\n  ".join(tail))
    print(f"{label}: context and CMake configure OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
