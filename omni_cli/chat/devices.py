"""`omni chat` on real devices: open the microphone (→ echo canceller → conversation) and the
speaker, run a `chat.ChatSession` on them, and close them whatever happens.

Where a device cannot be had, one line says what the session does instead: no echo canceller →
half-duplex; no speaker → replies as text; a microphone lost mid-session → typed questions when
stdin is a terminal, else the end of the session.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from omni_cli.chat.session import ChatSession, sigint_ends_session
from omni_cli.chat.transcript import SessionRecorder
from omni_cli.chat.view import ChatView
from omni_cli.config import ChatOptions
from omni_cli.conversation.ports import ReplySource
from omni_cli.conversation.turns import ConversationSettings, MicrophoneLost
from omni_cli.errors import AudioInputError

ECHO_TAIL_S = 0.2  # after the warm-up hiss, its echo may still reach the microphone

if TYPE_CHECKING:  # the devices are imported when run_chat opens them, not with this module
    from omni_cli.audio.echo import EchoCanceller
    from omni_cli.audio.mic import Microphone
    from omni_cli.audio.player import Player
    from omni_cli.terminal import NativeStderr


def run_chat(
    pipeline: ReplySource,
    options: ChatOptions,
    view: ChatView,
    read_line: Callable[[], str | None] | None = None,
    native_log: NativeStderr | None = None,
) -> int:
    """Open the devices, run the conversation until Ctrl-C (or end of typed input), save it; returns the exit code.

    With a microphone and a speaker, the microphone goes through the echo canceller (unless
    `--no-aec` or `--half-duplex`; where it cannot load, one line says so and the session is
    half-duplex). A speaker that cannot be opened leaves replies as text; a microphone that
    cannot be opened is an AudioInputError (raised, nothing recorded yet). A microphone lost
    mid-session, or the sound server gone (noticed within about a second), ends the session
    (exit code 1) unless stdin is a terminal, where the session goes on with typed questions.
    `native_log`, when given, moves into the session folder once it exists.
    """
    from omni_cli.audio.echo import warm_up_sound
    from omni_cli.audio.mic import Microphone
    from omni_cli.audio.vad import EndpointerConfig
    from omni_cli.audio.watch import SoundWatch
    from omni_cli.terminal import NATIVE_LOG_NAME

    read_line = read_line or (lambda: view.prompt("you> "))
    speculate = not options.text and 0 < options.speculate_ms < options.hangover_ms
    answer_after = options.answer_after_ms if 0 < options.answer_after_ms < options.hangover_ms else None
    vad_config = EndpointerConfig(
        hangover_ms=options.hangover_ms, aggressiveness=options.vad_aggressiveness, pause_ms=options.speculate_ms if speculate else 0
    )
    canceller = _echo_canceller(options, pipeline.sample_rate, view)
    # Without a canceller "auto" is half-duplex; --barge-in (a headset) listens regardless.
    barge_in = options.barge_in if canceller is not None or options.barge_in else False
    mic: Microphone | None = None
    if not options.text:
        clean = canceller.process if canceller is not None else None
        mic = Microphone(device=options.input_device, frame_ms=vad_config.frame_ms, sample_rate=vad_config.sample_rate, clean=clean).start()
    recorder: SessionRecorder | None = None
    player: Player | None = None
    saved = ""
    try:
        recorder = SessionRecorder(options.session_dir)
        player = _open_speaker(pipeline.sample_rate, options.output_device, view, canceller)
        warm_up = canceller is not None and mic is not None and player is not None and barge_in is None
        if canceller is not None and mic is not None and player is not None:
            canceller.set_delay_ms((player.output_latency + mic.input_latency) * 1000)
            if warm_up:  # a soft hiss the canceller learns the room from: the first reply can be interrupted
                player.play(warm_up_sound(player.sample_rate))
                player.wait_idle(timeout=3.0)
                time.sleep(ECHO_TAIL_S)
                mic.clear()  # the hiss is not a question
        settings = ConversationSettings(
            turn_detection=vad_config if mic is not None else None,
            full_duplex_hangover_ms=answer_after,
            barge_in=barge_in,
            speculate=speculate,
        )
        session = ChatSession(pipeline, view, recorder, mic=mic, player=player, settings=settings, echo=canceller)
        conversation = session.conversation
        if conversation.turn_detection_problem:
            view.note(f"{conversation.turn_detection_problem} Noise may start turns.")
        if mic is not None or player is not None:
            conversation.device_problem = SoundWatch(mic, player).problem
        recorder.event(
            "session",
            mode="text" if mic is None else "voice",
            barge_in="auto" if barge_in is None else barge_in,
            echo_cancellation=canceller is not None,
            echo_delay_ms=None if canceller is None else canceller.delay_ms,
            hangover_ms=options.hangover_ms,
            answer_after_ms=answer_after or 0,
            speculate_ms=options.speculate_ms if speculate else 0,
            echo_warm_up=warm_up,
            # After the hiss: converged (barge-in from the first reply), how far under it the echo came back
            # (None: never converged), and whether the microphone passes unchanged (no echo path: a headset).
            echo_converged=None if canceller is None else canceller.converged,
            echo_return_db=None if canceller is None or canceller.echo_return_db is None else round(min(canceller.echo_return_db, 99.0), 1),
            echo_bypassed=None if canceller is None else canceller.bypassed,
            microphone=None if mic is None else mic.device_name,
            microphone_rate=None if mic is None else mic.device_rate,
            speaker=None if player is None else player.device_name,
            speaker_rate=None if player is None else player.device_rate,
            speaker_latency_ms=None if player is None else round(player.output_latency * 1000, 1),
        )
        if native_log is not None:  # the folder exists from the first transcript line on
            native_log.keep_in(options.session_dir / NATIVE_LOG_NAME)
        view.note(f"saving this session to {options.session_dir}/")
        if barge_in is None and not canceller.converged:
            view.note("half-duplex until the echo canceller has learnt the room (a few seconds of omni speaking); then speak over omni to interrupt it.")
        view.start()
        with sigint_ends_session(session):
            code = _converse(session, read_line, mic, player, canceller)
        view.stop()
        saved = f"session saved: {recorder.transcript_path} ({session.turns} turns)"
        return code
    finally:
        view.stop()
        for opened in (recorder, player, mic):
            if opened is not None:
                opened.close()
        if saved:  # said once the devices let go (closing on a hung sound server takes 2 s): the process ends right after
            view.note(saved)


def _echo_canceller(options: ChatOptions, sample_rate: int | None, view: ChatView) -> EchoCanceller | None:
    """The session's echo canceller: only when omni both listens and speaks, and it was not turned off.

    Where it cannot run, one line says so and the session is half-duplex (unless --barge-in).
    """
    from omni_cli.audio.echo import EchoCanceller, EchoUnavailable

    if options.text or sample_rate is None or not options.echo_cancellation or options.barge_in is False:
        return None
    try:
        return EchoCanceller()
    except EchoUnavailable as exc:
        fallback = "" if options.barge_in else " Half-duplex: omni will not hear you while it speaks (with headphones, --barge-in)."
        view.note(f"{exc}{fallback}")
        return None


def _open_speaker(sample_rate: int | None, device: str | None, view: ChatView, canceller: EchoCanceller | None) -> Player | None:
    """The player at the reply audio's rate, telling the echo canceller what it plays; None (replies
    as text, said on screen) without a vocoder or a speaker."""
    from omni_cli.audio.player import Player

    if sample_rate is None:
        view.note("no --vocoder: replies are text only.")
        return None
    on_render = canceller.play_reference if canceller is not None else None
    try:
        return Player(device=device, sample_rate=sample_rate, on_render=on_render).start()
    except AudioInputError as exc:
        view.error(f"{exc} Replies will be text only.")
        return None


def _converse(
    session: ChatSession, read_line: Callable[[], str | None], mic: Microphone | None, player: Player | None, canceller: EchoCanceller | None
) -> int:
    """Run the session until it ends, then record the end with the devices' counters; returns the exit code."""
    from omni_cli.audio.watch import SoundWatch

    code, reason = 0, "end of input"
    try:
        if mic is not None:
            session.run_voice()
        else:
            session.run_text(read_line)
    except MicrophoneLost as exc:
        session.view.status("stopped")  # with the line saying why: closing the devices may take 2 s more
        session.view.error(str(exc))
        session.recorder.event("error", message=str(exc))
        if mic is not None:
            mic.close()
        conversation = session.conversation
        conversation.set_input(None)
        if _stdin_is_terminal() and not session.stop_requested:
            if player is not None and not player.active:  # the sound server went with the microphone
                conversation.sink = None
            speaker = player if conversation.sink is not None else None  # None too once a stuck speaker was dropped
            conversation.device_problem = SoundWatch(None, speaker).problem if speaker is not None else None
            session.view.note("going on with typed questions" + ("." if speaker is not None else ", replies as text."))
            session.run_text(read_line)
        else:
            code, reason = 1, "microphone lost"
    finally:
        if session.stop_requested:
            reason = "ctrl-c"
        counters: dict[str, Any] = {}
        if mic is not None:
            counters.update(mic_overflows=mic.overflows, mic_dropped_frames=mic.dropped_frames)
        if player is not None:
            counters.update(speaker_underruns=player.underruns, speaker_xruns=player.xruns)
        if canceller is not None:
            counters.update(echo_far_s=round(canceller.far_active_s, 1), echo_converged=canceller.converged)
        session.close(reason, **counters)
    return code


def _stdin_is_terminal() -> bool:
    import sys

    try:
        return sys.stdin.isatty()
    except (ValueError, AttributeError):
        return False
