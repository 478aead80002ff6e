"""Session-wide test setup."""
import signal

# The Ctrl-C tests send SIGINT to the trainers they start. A shell that runs the suite as a background job (`cmd &`
# in a script) starts it with SIGINT ignored, and an ignored signal stays ignored across exec: the trainers' Python
# would install no KeyboardInterrupt handler and train on. Restore the default here, so the children start with it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
