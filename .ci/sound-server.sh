#!/usr/bin/env bash
# System packages for the audio tests, installed only when missing (safe to run again):
#   pulseaudio        a userspace sound server: virtual mic and speaker without a sound card
#                     (pulls in libasound2-plugins, ALSA's pulse plugin, as a dependency)
#   pulseaudio-utils  pactl, paplay, parec/parecord: drive and record that server
#   libportaudio2     the C library behind the `sounddevice` Python package
#   espeak-ng, sox    make and pad test speech
set -euo pipefail

packages=(pulseaudio pulseaudio-utils libportaudio2 espeak-ng sox)

as_root=()
if [ "$(id -u)" -ne 0 ]; then
    as_root=(sudo)
fi

missing=()
for package in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    echo "sound-server.sh: installing ${missing[*]}"
    install=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}")
    # A fresh container has no package lists: update only when the install cannot find the packages.
    if ! "${install[@]}" >/dev/null; then
        "${as_root[@]}" apt-get update -q >/dev/null
        "${install[@]}" >/dev/null
    fi
fi

# PortAudio (Debian's build has no PulseAudio backend) reaches the server through ALSA's
# pulse plugin. The pulseaudio package ships /etc/alsa/conf.d/99-pulse.conf, which makes
# ALSA's `default` device the pulse plugin whenever a server is reachable; only where that
# file is missing (and nobody configured ALSA) do we route `default` to pulse ourselves.
if [ ! -e /etc/alsa/conf.d/99-pulse.conf ] && [ ! -e /etc/asound.conf ]; then
    echo "sound-server.sh: writing /etc/asound.conf (ALSA default -> PulseAudio)"
    printf 'pcm.!default { type pulse }\nctl.!default { type pulse }\n' | "${as_root[@]}" tee /etc/asound.conf >/dev/null
fi

for tool in pulseaudio pactl paplay parec parecord espeak-ng sox; do
    command -v "$tool" >/dev/null || { echo "sound-server.sh: $tool still missing after install" >&2; exit 1; }
done
