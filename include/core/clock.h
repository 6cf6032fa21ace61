#ifndef MOCO_CORE_CLOCK_H
#define MOCO_CORE_CLOCK_H

/* Seconds from CLOCK_MONOTONIC: for durations and deadlines, never for dates. Read through the vDSO
 * (tens of nanoseconds), so the training step can time each of its phases every step. */
double clock_now(void);

#endif
