-- The Daily room Cattery made for a session (docs/daily.md), kept with the session so that
-- its deletion survives the server: whichever process records the session's end (this
-- server, the next one after a crash) deletes it. `daily_room_keep`: kept when the session
-- reached its agent (`keepDailyRooms` when the room was made).
ALTER TABLE sessions ADD COLUMN daily_room TEXT;
ALTER TABLE sessions ADD COLUMN daily_room_keep INTEGER NOT NULL DEFAULT 0;
