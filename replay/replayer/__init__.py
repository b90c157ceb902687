"""bits-replay's engine: captured BITS sessions resent to a live server, answers compared.

Rooms, in the order data flows through them:
- plan: the captures read once (through the analyzer) into the sessions and requests to send,
  bodies spooled to a temporary file;
- options: the target and what the user asked for;
- pacing: the replay's clock (capture time at a speed);
- connections: one live connection per captured one, over replay.transport;
- session: one session replayed, faithful or adaptive;
- schedule: sessions started in capture order, overlapping as they did; the dry run;
- compare: captured and live answers side by side;
- results, report, progress: what happened, as text and JSON, and while it happens.
"""
