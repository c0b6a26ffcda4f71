"""Vocoders: speech units -> waveform.

- `base`: the `Vocoder` interface, streaming with crossfades, helpers every vocoder shares;
- `hifigan`: the HiFi-GAN generator and its log-mel front end;
- `code_hifigan`: fairseq's unit HiFi-GAN (the authors' vocoder);
- `unit2mel`, `unit_mel`: a units -> log-mel model, and the vocoder that chains it with HiFi-GAN;
- `onnx`: HiFi-GAN on ONNX Runtime, optionally with int8 stages;
- `io`: vocoder and generator folders, the packaged HiFi-GAN weights;
- `train`, `distill`: training of the unit -> mel model, distillation of a small HiFi-GAN.

This package imports only `echox.audio`, `echox.fileio`, `echox.config`, `echox.errors` and
`echox.hub` from the rest of EchoX.
"""
