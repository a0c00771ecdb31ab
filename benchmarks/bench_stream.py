"""Streaming continuation with the bundled model: how soon the first continued audio comes, whether a
real-time listener is ever starved, and what the stream costs over sampling alone.

  - time to first continued audio = model load + prompt read + first chunk, from
    `stream_continuation` to the first continuation chunk (the example prompt, 5 s);
  - a consumer that takes audio at real-time pace from the stream, after a 0.25 s head start,
    counting the times it found nothing to play over a 60 s continuation, beside the step's own
    speed measured in the same run (the stream cannot keep up below 1× real time);
  - the stream's overhead (post-processing, chunking, file writing) against the sampler alone
    (Sampler.take for the same samples, same seed, same chunks), interleaved, best of five.

    python benchmarks/bench_stream.py            # all
    python benchmarks/bench_stream.py --quick    # 10 s instead of 60 s
"""

from __future__ import annotations

import time
from pathlib import Path

from common import parse_args, run_child

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ROOT / "examples" / "prompt.wav"


def first_audio() -> dict:
    from s4music.generate import GenerateOptions, stream_continuation

    started = time.perf_counter()
    generation = stream_continuation(PROMPT, options=GenerateOptions(seconds=1, seed=0))
    ready = time.perf_counter()
    for chunk in generation:
        if chunk.start > 0:  # the first chunk after the prompt's: continued audio
            break
    first = time.perf_counter()
    t = generation.timings
    return {"load_s": t.load_s, "prefill_s": t.prefill_s, "first_chunk_s": first - ready, "total_s": first - started,
            "step": generation.step}


def realtime_consumer(seconds: float) -> dict:
    import threading

    from s4music.generate import GenerateOptions, Output, stream_continuation

    generation = stream_continuation(PROMPT, options=GenerateOptions(seconds=seconds, seed=0,
                                                                     output=Output(include_prompt=False)))
    sr, total = generation.sample_rate, generation.frames
    state = {"available": 0, "underruns": 0}

    def listen() -> None:
        """Take 20 ms of audio every 20 ms of the clock, after a 0.25 s head start; a block that is
        not there in time is an underrun (and moves the clock, as a player's stall would)."""
        while state["available"] < min(total, 0.25 * sr):
            time.sleep(0.001)
        clock, played = time.perf_counter(), 0
        while played < total:
            want = min(int(0.02 * sr), total - played)
            clock += want / sr
            if state["available"] < played + want:
                state["underruns"] += 1
                while state["available"] < played + want:
                    time.sleep(0.001)
                clock = max(clock, time.perf_counter())
            played += want
            time.sleep(max(0.0, clock - time.perf_counter()))

    listener = threading.Thread(target=listen)
    listener.start()
    t0 = time.perf_counter()
    for chunk in generation:
        state["available"] += chunk.after(generation.first_frame).shape[1]
    produced_s = time.perf_counter() - t0
    listener.join()
    return {"underruns": state["underruns"], "speed_x_realtime": seconds / produced_s, "step": generation.step}


def overhead(seconds: float, rounds: int = 5) -> dict:
    import tempfile

    from s4music.generate import GenerateOptions, stream_continuation, write_generation
    from s4music.generate.stream import CHUNK, FIRST_CHUNK

    options = GenerateOptions(seconds=seconds, seed=0)
    first = stream_continuation(PROMPT, options=options)  # the model and the prompt's state, read once
    stream, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):  # interleaved: the machine's slower phases touch both alike
            sampler = first.stepper.sampler(first.prompt.state, first.prompt.codes[-1:], first.seeds, first.sampling)
            t0 = time.perf_counter()
            done = 0
            while done < first.samples:  # the same chunks the stream takes
                n = min(first.samples - done, FIRST_CHUNK if done == 0 else CHUNK)
                sampler.take(n)
                done += n
            plain.append(time.perf_counter() - t0)
            generation = stream_continuation(PROMPT, first.net, options)
            t0 = time.perf_counter()
            write_generation(generation, Path(tmp) / "out.wav", "bundled", str(PROMPT))
            stream.append(time.perf_counter() - t0)
    return {"stream_s": min(stream), "sampler_s": min(plain)}


def main() -> None:
    args = parse_args({"first": first_audio, "consumer": realtime_consumer, "overhead": overhead})
    if args is None:
        return
    seconds = 10.0 if args.quick else 60.0
    print("## Streaming continuation, bundled model, CPU\n")
    first = run_child(__file__, "first")
    if "error" in first:
        print(f"time to first continued audio: failed: {first['error']}\n")
    else:
        print(f"Time to the first continued audio (`stream_continuation` of `examples/prompt.wav`, {first['step']}): "
              f"{first['total_s']:.2f} s = model load {first['load_s']:.2f} s + prompt read {first['prefill_s']:.2f} s "
              f"+ first chunk {first['first_chunk_s']:.3f} s (bound for the first chunk: 0.25 s).\n")
    consumer = run_child(__file__, "consumer", seconds=seconds)
    if "error" in consumer:
        print(f"real-time consumer: failed: {consumer['error']}\n")
    else:
        print(f"A consumer taking {seconds:g} s of continuation at real-time pace (0.25 s head start) ran dry "
              f"{consumer['underruns']} time(s); the stream ran at {consumer['speed_x_realtime']:.2f}× real time in the same run "
              f"({consumer['step']}; the bound for never starving is 1.0× real time, the target holds from 1.1× real time).\n")
    cost = run_child(__file__, "overhead", seconds=min(seconds, 10.0))
    if "error" in cost:
        print(f"overhead: failed: {cost['error']}")
    else:
        print(f"Overhead of the stream (post-processing, chunks, the file and its sidecar written, the takes "
              f"judged) over sampling alone, {min(seconds, 10.0):g} s, best of five interleaved: "
              f"{cost['stream_s']:.2f} s against {cost['sampler_s']:.2f} s, "
              f"{100 * (cost['stream_s'] / cost['sampler_s'] - 1):+.1f}% (target: under 5%).")


if __name__ == "__main__":
    main()
