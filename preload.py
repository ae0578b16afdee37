"""Automatic1111/Forge command-line options of the SeqLoRA extension (the web UI calls ``preload``)."""


def preload(parser):
    parser.add_argument(
        "--seqlora-dir",
        type=str,
        default=None,
        help="folder of SeqLoRA bank files (default: <models>/seqlora); training progress goes in its .autosave",
    )
